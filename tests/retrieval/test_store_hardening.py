"""Issue 12: the datastore never deletes a user's file, never crashes on damage, never answers wrong.

Each test is named after the defect it reproduces (item numbers of the issue). Real LMDB, real
Arrow files, real tokenizers; kills and damaged files run in child processes, so a signal fails
the test instead of killing pytest. Tests run as root here, where permission bits are ignored:
the permission tests drop to user ``nobody`` in a child (os.setuid) and skip where that is
impossible.
"""

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import lmdb
import numpy as np
import pytest

from retrodraft.retrieval import (
    CorruptDatastoreError,
    Datastore,
    DatastoreError,
    Document,
    StaleDatastoreError,
    tokenizer_fingerprint,
)
from retrodraft.retrieval import build as build_mod
from retrodraft.retrieval import swap
from retrodraft.retrieval.learned import LEGACY_NAME as ONLINE_STATE  # the record of older datastores
from test_store import DOCS_A, DOCS_B, ROOT, digest

NOBODY = 65534


def wordlevel():
    """A word-level tokenizer trained on the test documents: real, and fast to fingerprint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator([d.text for d in DOCS_A + DOCS_B], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", name_or_path="tiny-wordlevel")


@pytest.fixture(scope="module")
def tok():
    return wordlevel()


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    """``tok`` saved, for child processes to load."""
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    os.chmod(d, 0o755)
    return d


def build(path, tok, docs=DOCS_A, **kw) -> Datastore:
    return Datastore.build(path, docs, tok, progress=False, **kw)


# Root passes every permission check, so a child that must meet one gives up the capabilities
# that bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER) and stays root: it can
# still run this Python (installed under /root), but not write to what belongs to nobody.
DROP_DAC = """
import ctypes
class _Hdr(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class _Caps(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
_libc = ctypes.CDLL(None, use_errno=True)
_hdr, _caps = _Hdr(0x20080522, 0), (_Caps * 2)()
assert _libc.capget(ctypes.byref(_hdr), _caps) == 0
_caps[0].effective &= ~0b1110
_caps[0].permitted &= ~0b1110
assert _libc.capset(ctypes.byref(_hdr), _caps) == 0, ctypes.get_errno()
"""


def run_child(code: str, *args, drop_dac: bool = False) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python (argv[1:] = args), without permission-bypassing capabilities
    if ``drop_dac``; the process, not only its output."""
    pre = f"import os, sys; sys.path.insert(0, {str(ROOT)!r})\n" + (DROP_DAC if drop_dac else "")
    src = pre + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", src, *map(str, args)], capture_output=True, text=True, timeout=180)


def give_to_nobody(*paths: Path) -> None:
    """chown -R to nobody: read-only (mode 755/644) to a process without DAC capabilities."""
    for top in paths:
        for p in [top, *top.rglob("*")]:
            os.chown(p, NOBODY, NOBODY, follow_symlinks=False)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to nobody")


# ---- 1. a build deletes the user's files ------------------------------------------------------


def test_item1_a_directory_with_meta_lmdb_is_not_a_datastore(tmp_path, tok):
    d = tmp_path / "d"
    (d / "meta.lmdb").mkdir(parents=True)
    (d / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a datastore"):
        build(d, tok)
    assert sorted(p.name for p in d.iterdir()) == ["meta.lmdb", "notes.txt"]
    assert not (tmp_path / "d.lock").exists()  # refused before anything was written beside it
    empty = tmp_path / "empty"
    empty.mkdir()
    build(empty, tok).close()  # an empty directory loses nothing


def test_item1_rebuild_and_append_keep_files_the_datastore_did_not_create(tmp_path, tok):
    d = tmp_path / "ds"
    build(d, tok).close()
    (d / "notes.txt").write_text("mine")
    (d / "sub").mkdir()
    (d / "sub" / "deep.txt").write_text("deep")
    (d / "link").symlink_to("notes.txt")
    build(d, tok, DOCS_B).close()
    with Datastore.open(d, readonly=False) as ds:
        assert ds.num_documents == 2
        ds.append(DOCS_A, tok, progress=False)
    assert (d / "notes.txt").read_text() == "mine" and (d / "sub" / "deep.txt").read_text() == "deep"
    assert os.readlink(d / "link") == "notes.txt"


# ---- 2. a full build lost to a racing append -----------------------------------------------------


def test_item2_writers_of_one_path_run_one_after_another(tmp_path, tok):
    path = tmp_path / "ds"
    build(path, tok).close()
    inside, release, errors = threading.Event(), threading.Event(), []

    def slow():
        yield DOCS_B[0]
        inside.set()
        release.wait(60)
        yield DOCS_B[1]

    def append():
        try:
            with Datastore.open(path, readonly=False) as ds:
                ds.append(slow(), tok, progress=False)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    def rebuild():
        try:
            build(path, tok, DOCS_B[:1]).close()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    a = threading.Thread(target=append)
    a.start()
    assert inside.wait(60)
    b = threading.Thread(target=rebuild)
    b.start()
    b.join(1.5)
    waited = b.is_alive()  # the build must wait for the append in flight
    release.set()
    a.join(60)
    b.join(60)
    assert not errors and waited
    with Datastore.open(path) as ds:
        assert ds.num_documents == 1  # the build came last and its version stands


def test_item2_an_append_that_waited_for_a_build_is_stale(tmp_path, tok):
    path = tmp_path / "ds"
    build(path, tok).close()
    with Datastore.open(path, readonly=False) as old:
        build(path, tok, DOCS_B).close()
        with pytest.raises(StaleDatastoreError):
            old.append(DOCS_A, tok, progress=False)
    with Datastore.open(path) as ds:
        assert ds.num_documents == 2


# ---- 3. the non-atomic fallback swap ----------------------------------------------------------------

KILL_AT_RENAME = """
import os, signal
from transformers import PreTrainedTokenizerFast
from retrodraft.retrieval import Datastore, Document
from retrodraft.retrieval import swap
swap._exchange = lambda a, b: False  # as on macOS or NFS
real, calls = os.rename, []
def rename(a, b):
    calls.append((a, b))
    if len(calls) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
os.rename = rename
tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[2])
Datastore.build(sys.argv[1], [Document("/new.txt", 0, "add a b")], tok, progress=False).close()
"""


@pytest.mark.parametrize("kill_at", [2, 3])
def test_item3_fallback_swap_killed_between_renames_keeps_a_datastore(tmp_path, tok, tok_dir, kill_at):
    path = tmp_path / "ds"
    with build(path, tok) as ds:
        old = digest(ds)
    p = run_child(KILL_AT_RENAME, path, tok_dir, kill_at)
    assert p.returncode == -signal.SIGKILL, p.stderr
    # Killed before the new version went in (2): the old one comes back; after (3): the new one stays.
    with Datastore.open(path) as ds:
        assert (digest(ds) == old) == (kill_at == 2) and ds.num_documents == (3 if kill_at == 2 else 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ds.lock"]  # the aside copy is put back or gone
    build(path, tok, DOCS_B).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ds.lock"]


def test_item3_fallback_swap_replaces_like_the_exchange(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(swap, "_exchange", lambda a, b: False)
    path = tmp_path / "ds"
    build(path, tok).close()
    (path / "notes.txt").write_text("mine")
    build(path, tok, DOCS_B).close()
    with Datastore.open(path) as ds:
        assert ds.num_documents == 2 and (path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ds.lock"]


# ---- 5, 6. damaged LMDB: a signal, or wrong values --------------------------------------------------

OPEN_REPORT = """
import json
from retrodraft.retrieval import Datastore, DatastoreError
out = {}
for path in sys.argv[1:]:
    try:
        with Datastore.open(path) as ds:
            [ds.document(i) for i in range(ds.num_documents)]
        out[path] = "opened"
    except DatastoreError as e:
        out[path] = f"{type(e).__name__} {e}"
print(json.dumps(out))
"""

DAMAGE = {  # what: (byte of the meta page LMDB reads to flip, or None; length to truncate to, or None)
    "truncated to 1 page": (None, 4096),
    "truncated mid-file": (None, 20000),
    "truncated by a byte": (None, -1),
    "meta page flags": (10, None),
    "map size": (36, None),
    "page size": (41, None),
    "main root page": (128, None),
    "last page number": (136, None),
    "transaction id": (144, None),
}


def _damage_data_mdb(path: Path, offset: int | None, size: int | None) -> None:
    """Flip byte ``offset`` of the meta page LMDB reads (the newer one), then truncate to ``size``."""
    f = path / "meta.lmdb" / "data.mdb"
    data = bytearray(f.read_bytes())
    if offset is not None:
        newer = 4096 if struct.unpack_from("<Q", data, 4096 + 144) > struct.unpack_from("<Q", data, 144) else 0
        data[newer + offset] ^= 0xFF
    f.write_bytes(bytes(data[:size]))


def test_item5_damaged_lmdb_header_is_an_error_not_a_signal(tmp_path, tok):
    build(tmp_path / "ds", tok).close()
    paths = {}
    for i, (what, (offset, size)) in enumerate(DAMAGE.items()):
        paths[what] = tmp_path / f"ds{i}"
        shutil.copytree(tmp_path / "ds", paths[what])
        _damage_data_mdb(paths[what], offset, size)
    p = run_child(OPEN_REPORT, *paths.values())  # one process: a signal on any fails the test
    assert p.returncode == 0, f"exit {p.returncode} {p.stderr[-2000:]}"
    got = json.loads(p.stdout)
    for what, path in paths.items():
        msg = got[str(path)]
        assert msg.startswith("CorruptDatastoreError") and "data.mdb" in msg and "build_index.py" in msg, (what, msg)


def _put_raw(path: Path, db: bytes, key: bytes, change) -> None:
    """Rewrite one stored value through LMDB itself (as a bit flip on disk might leave it)."""
    env = lmdb.open(str(path / "meta.lmdb"), max_dbs=4, map_size=1 << 36)
    with env.begin(write=True, db=env.open_db(db)) as txn:
        txn.put(key, change(bytearray(txn.get(key))))
    env.close()


def _flip_last(v: bytearray) -> bytes:
    v[-1] ^= 0x01
    return bytes(v)


def test_item6_damaged_values_raise_naming_what_not_wrong_answers(tmp_path, tok):
    path = tmp_path / "ds"
    build(path, tok).close()
    with Datastore.open(path, readonly=False) as ds:
        ds.save_state("s", {"a": np.arange(5)})
    _put_raw(path, b"docs", (1).to_bytes(8, "big"), _flip_last)
    _put_raw(path, b"state", b"s\0a", _flip_last)
    with Datastore.open(path) as ds:
        assert ds.document(0).path == "/src/a.py"
        with pytest.raises(CorruptDatastoreError, match=r"document 1 in .*meta\.lmdb is damaged.*build_index\.py"):
            ds.document(1)
        with pytest.raises(CorruptDatastoreError, match="state 's' array 'a'"):
            ds.load_state("s")
    _put_raw(path, b"meta", b"meta", lambda v: bytes(v).replace(b'"documents": 3', b'"documents": 2'))
    with pytest.raises(CorruptDatastoreError, match="metadata record"):
        Datastore.open(path)


def test_item6_a_lost_state_array_is_noticed(tmp_path, tok):
    path = tmp_path / "ds"
    build(path, tok).close()
    with Datastore.open(path, readonly=False) as ds:
        ds.save_state("s", {"a": np.arange(5), "b": np.zeros(2)})
    env = lmdb.open(str(path / "meta.lmdb"), max_dbs=4, map_size=1 << 36)
    with env.begin(write=True, db=env.open_db(b"state")) as txn:
        txn.delete(b"s\0b")
    env.close()
    with Datastore.open(path) as ds, pytest.raises(CorruptDatastoreError, match="array 'b'.* is missing"):
        ds.load_state("s")


# ---- 7. NaN in the stored calibration ----------------------------------------------------------------


def test_item7_invalid_calibration_is_reset_with_a_warning(tmp_path, tok, caplog):
    from retrodraft.retrieval.calibration import BUCKETS, DEPTHS, VERDICTS

    path = tmp_path / "ds"
    build(path, tok).close()
    seen = np.ones((1, VERDICTS, DEPTHS, BUCKETS))
    with Datastore.open(path, readonly=False) as ds:
        ds.save_state(ONLINE_STATE, {"calibration_names": np.array(["corpus"], "U64"), "calibration_seen": seen,
                                     "calibration_hits": seen * np.nan, "calibration_raw": seen})
    with Datastore.open(path, readonly=False) as ds, caplog.at_level(logging.WARNING):
        calibrator = ds.online(64).calibrator
        assert calibrator.names == [] and "calibration" in caplog.text and "afresh" in caplog.text
        ds.commit(np.array([1, 2, 3], np.int32))
    caplog.clear()
    with Datastore.open(path) as ds, caplog.at_level(logging.WARNING):
        assert np.isfinite(ds.online(64).calibrator.hits).all() and "afresh" not in caplog.text


# ---- 9. the tokenizer fingerprint misses changes --------------------------------------------------------


def test_item9_fingerprint_covers_added_tokens_and_normaliser():
    from tokenizers import normalizers

    a, b = wordlevel(), wordlevel()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    a("some text", truncation=True, max_length=4)  # call settings are not the tokenizer
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.add_tokens(["return"])  # already in the vocabulary: same ids table, but texts tokenize differently
    assert b.get_vocab() == a.get_vocab()
    assert b("returns", add_special_tokens=False)["input_ids"] != a("returns", add_special_tokens=False)["input_ids"]
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    c = wordlevel()
    c.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(c)
    d = wordlevel()
    d.add_tokens(["[NEW]"], special_tokens=True)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(d)


# ---- 12. memory on one huge document ---------------------------------------------------------------------


def test_item12_long_documents_tokenize_in_pieces_to_the_same_ids(monkeypatch):
    from retrodraft.decode import load_tokenizer

    t = load_tokenizer()
    code = Path(json.__file__).read_text()[:20000]
    texts = [code, " ".join(code.split()), "word " * 3000 + "x" * 700 + " tail"]
    monkeypatch.setattr(build_mod, "PIECE_CHARS", 500)
    assert max(len(p) for p in build_mod.pieces(texts[0], 500)) <= 500
    assert "".join(build_mod.pieces(texts[2], 500)) == texts[2]
    docs = [Document("/x", i, text) for i, text in enumerate(texts)]
    chunks, lengths, _, _ = build_mod._tokenize(docs, t, False, {})
    stream = np.concatenate(chunks)
    ends = np.cumsum(lengths + 1)
    for i, text in enumerate(texts):
        whole = t(text, add_special_tokens=False)["input_ids"]
        got = stream[ends[i] - lengths[i] - 1 : ends[i] - 1].tolist()
        if i < 2:
            assert got == whole
        else:  # 700 characters without a space: one hard cut inside them, the rest equal
            assert t.decode(got) == text and abs(len(got) - len(whole)) <= 2


# ---- 13, 14. read-only use, unwritable directories --------------------------------------------------------


@needs_root
def test_item13_another_users_datastore_opens_read_only(tmp_path, tok):
    d = tmp_path / "theirs"
    d.mkdir()
    with build(d / "ds", tok) as ds:
        mine = digest(ds)
    give_to_nobody(d)
    p = run_child("""
        from retrodraft.retrieval import Datastore
        from test_store import digest
        with Datastore.open(sys.argv[1]) as ds:
            print(digest(ds))
    """.replace("from test_store", f"sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT / 'tests' / 'retrieval')!r}]; from test_store"), d / "ds",
        drop_dac=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout) == json.loads(mine) and "without LMDB's lock file" in p.stderr


@needs_root
def test_item14_writing_without_permission_is_one_clear_error(tmp_path, tok):
    d = tmp_path / "theirs"
    d.mkdir()
    build(d / "ds", tok).close()
    give_to_nobody(d)
    p = run_child("""
        from retrodraft.retrieval import Datastore, DatastoreError
        for attempt in ("open", "build"):
            try:
                if attempt == "open":
                    Datastore.open(sys.argv[1], readonly=False)
                else:
                    Datastore.build(sys.argv[1] + "-new", [], None)
            except DatastoreError as e:
                print(type(e).__name__, "|", e)
    """, d / "ds", drop_dac=True)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert len(lines) == 2 and all(ln.startswith("DatastorePermissionError | ") for ln in lines)
    assert "readonly=True" in lines[0] and "another --out" in lines[1]
    from retrodraft.retrieval.errors import DatastorePermissionError

    assert issubclass(DatastorePermissionError, PermissionError)


# ---- 16. housekeeping ------------------------------------------------------------------------------------------


def test_item16_open_clears_killed_builds_debris(tmp_path, tok):
    build(tmp_path / "ds", tok).close()
    dead = tmp_path / "ds.incomplete-dead"
    dead.mkdir()
    (dead / "build.lock").touch()
    (tmp_path / "ds.incomplete-notours").mkdir()  # no build lock: not ours, left alone
    Datastore.open(tmp_path / "ds").close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ds.incomplete-notours", "ds.lock"]


def test_item16_rebuild_says_it_drops_the_learned_state_or_keeps_it(tmp_path, tok):
    path = tmp_path / "ds"
    build(path, tok).close()
    with build(path, tok) as ds:
        assert ds.stats.state == "none"
    with Datastore.open(path, readonly=False) as ds:
        ds.save_state("s", {"a": np.arange(3)})
    with build(path, tok, DOCS_B, keep_state=True) as ds:
        assert ds.stats.state == "carried" and ds.load_state("s")["a"].tolist() == [0, 1, 2]
    with build(path, tok, DOCS_A) as ds:
        assert ds.stats.state == "dropped" and ds.load_state("s") is None


def test_item16_opening_what_is_not_a_datastore_leaves_nothing_beside_it(tmp_path):
    (tmp_path / "plain").mkdir()
    for name in ("plain", "nothing"):
        with pytest.raises((FileNotFoundError, DatastoreError)):
            Datastore.open(tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == ["plain"]
