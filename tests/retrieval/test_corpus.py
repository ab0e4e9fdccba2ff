"""Corpus readers: file types, field selection, skips counted by reason, empty corpus."""

import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrodraft.retrieval.corpus import Document, EmptyCorpusError, SkipCounts, iter_documents


def read(root, **kw):
    skipped = SkipCounts()
    return list(iter_documents(root, skipped=skipped, **kw)), skipped


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def test_text_tree_in_sorted_order_with_skips_counted(tmp_path):
    write(tmp_path / "b.md", "# title\n")
    write(tmp_path / "a" / "z.py", "x = 1\n")
    write(tmp_path / "a" / "b.txt", "hello\n")
    write(tmp_path / "empty.txt", b"")
    write(tmp_path / "blank.rst", "  \n\t\n")
    write(tmp_path / "nul.c", b"int x;\0\0binary")
    write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1"))
    write(tmp_path / "image.png", b"\x89PNG")
    write(tmp_path / ".hidden.txt", "secret")
    write(tmp_path / ".git" / "config.txt", "x")
    write(tmp_path / "node_modules" / "m.js", "x")
    write(tmp_path / "bom.txt", "\ufeffbom text".encode("utf-8"))
    docs, skipped = read(tmp_path)
    root = str(tmp_path.absolute())
    assert docs == [
        Document(f"{root}/a/b.txt", 0, "hello\n"),
        Document(f"{root}/a/z.py", 0, "x = 1\n"),
        Document(f"{root}/b.md", 0, "# title\n"),
        Document(f"{root}/bom.txt", 0, "bom text"),
    ]
    assert skipped == SkipCounts(empty=2, binary=1, undecodable=1, other_type=1, excluded=3)


def test_exclude_can_be_emptied(tmp_path):
    write(tmp_path / "node_modules" / "m.js", "x")
    docs, _ = read(tmp_path, exclude=())
    assert [Path(d.path).name for d in docs] == ["m.js"]


def test_jsonl_default_fields_record_index_and_bad_lines(tmp_path):
    lines = [
        json.dumps({"question": "Q1?", "answer": "A1", "id": 7}),
        "",
        "{not json",
        json.dumps({"id": 3}),
        json.dumps({"text": "t", "content": "c"}),
    ]
    f = write(tmp_path / "d.jsonl", "\n".join(lines).encode() + b"\n\xff\xfe\n")
    docs, skipped = read(f)
    assert [(d.index, d.text) for d in docs] == [(0, "Q1?\n\nA1"), (4, "t\n\nc")]
    assert skipped == SkipCounts(malformed=1, no_text=1, undecodable=1)


def test_field_selection_and_conversations(tmp_path):
    f = write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in [
        {"question": "Q", "answer": "A"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    ]))
    docs, skipped = read(f, fields=["answer"])
    assert [d.text for d in docs] == ["A"] and skipped.no_text == 2
    docs, _ = read(f)
    assert [d.text for d in docs] == ["Q\n\nA", "hi\n\nhello", "2+2?\n\n4"]


def test_json_list_single_object_and_repeated_values(tmp_path):
    rows = [{"instruction": "Do", "input": "", "response": "ok", "output": "ok"}, {"answer": 42}, "bare text"]
    docs, _ = read(write(tmp_path / "list.json", json.dumps(rows)))
    # output mirrors response: taken once; an empty input adds nothing; numbers become text.
    assert [(d.index, d.text) for d in docs] == [(0, "Do\n\nok"), (1, "42"), (2, "bare text")]
    docs, _ = read(write(tmp_path / "one.json", json.dumps({"prompt": "p", "completion": "c"})))
    assert [(d.index, d.text) for d in docs] == [(0, "p\n\nc")]
    with pytest.raises(EmptyCorpusError, match="1 no_text"):
        read(tmp_path / "one.json", fields=["missing"])


def test_malformed_json_is_counted(tmp_path):
    write(tmp_path / "bad.json", "[{")
    write(tmp_path / "ok.txt", "fine")
    docs, skipped = read(tmp_path)
    assert len(docs) == 1 and skipped.malformed == 1


def test_parquet_reads_only_selected_columns(tmp_path):
    table = pa.table({
        "prompt": ["p0", "p1", None],
        "response": ["r0", "r1", "r2"],
        "messages": [[{"role": "user", "content": "m0"}], [], [{"role": "user", "content": "m2"}]],
        "blob": [b"x", b"y", b"z"],
    })
    f = tmp_path / "t.parquet"
    pq.write_table(table, f)
    docs, _ = read(f)
    assert [(d.index, d.text) for d in docs] == [(0, "p0\n\nr0\n\nm0"), (1, "p1\n\nr1"), (2, "r2\n\nm2")]
    docs, _ = read(f, fields=["response"])
    assert [d.text for d in docs] == ["r0", "r1", "r2"]
    write(tmp_path / "x.txt", "x")
    docs, skipped = read(tmp_path, fields=["nope"])
    assert [Path(d.path).name for d in docs] == ["x.txt"] and skipped.no_text == 3


def test_corrupt_and_empty_parquet_are_counted(tmp_path):
    write(tmp_path / "bad.parquet", b"PAR1 not really")
    write(tmp_path / "empty.parquet", b"")
    write(tmp_path / "ok.md", "ok")
    _, skipped = read(tmp_path)
    assert skipped.malformed == 1 and skipped.empty == 1


def test_single_file_with_unknown_suffix_is_text(tmp_path):
    docs, _ = read(write(tmp_path / "notes.log", "line\n"))
    assert [d.text for d in docs] == ["line\n"]


def test_empty_corpus_is_an_error_naming_the_skips(tmp_path):
    write(tmp_path / "e.txt", b"")
    write(tmp_path / "b.txt", b"\0")
    with pytest.raises(EmptyCorpusError, match="1 empty, 1 binary"):
        read(tmp_path)
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "missing")


def test_gsm8k_question_and_answer(shared_dir):
    docs, skipped = read(shared_dir / "data" / "corpora" / "gsm8k_train.jsonl")
    assert len(docs) == 7473 and skipped.total() == 0
    assert docs[0].text.startswith("Natalia sold clips") and "\n\n" in docs[0].text and docs[0].text.endswith("#### 72")


def test_python_stdlib_skips_site_packages():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, skipped = read(stdlib)
    names = {Path(d.path).relative_to(stdlib).as_posix() for d in docs}
    assert {"os.py", "json/__init__.py", "LICENSE.txt"} <= names
    assert not any(n.startswith("site-packages/") or "__pycache__" in n for n in names)
    assert skipped.other_type > 0 and skipped.excluded > 0


# ---- issue 12, item 11: one bad file never stops a build -----------------------------------------


def test_item11_unusable_files_are_skipped_counted_and_named(tmp_path):
    import os

    write(tmp_path / "good.txt", "fine")
    write(tmp_path / "deep.json", "[" * 100_000 + "]" * 100_000)
    write(tmp_path / "deep.jsonl", '{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "nothing")
    os.mkfifo(tmp_path / "pipe.txt")
    write(tmp_path / "sub" / "x.txt", "below a link")
    (tmp_path / "mem.txt").symlink_to("/proc/self/mem")  # a regular file whose read fails (EIO), even for root
    docs, skipped = read(tmp_path)
    assert [Path(d.path).name for d in docs] == ["deep.jsonl", "good.txt", "x.txt"]
    assert (skipped.malformed, skipped.unreadable, skipped.special) == (2, 3, 1)
    assert skipped.named == {
        "malformed": [str(tmp_path / "deep.json"), str(tmp_path / "deep.jsonl")],
        "unreadable": [str(tmp_path / n) for n in ("dangling.txt", "loop.txt", "mem.txt")],
        "special": [str(tmp_path / "pipe.txt")],
    }
    assert "named" not in skipped.as_dict() and skipped.total() == 6


@pytest.mark.parametrize("make", ["fifo", "device", "loop"])
def test_item11_a_fifo_device_or_link_loop_as_the_corpus_is_a_clear_error(tmp_path, make):
    import os

    root = tmp_path / "corpus"
    if make == "fifo":
        os.mkfifo(root)
    elif make == "device":
        root = Path("/dev/zero")  # read to the end, it never ends
    else:
        root.symlink_to(root)
    with pytest.raises(EmptyCorpusError, match="special" if make != "loop" else "unreadable"):
        read(root)


def test_item11_a_folder_or_file_without_read_permission_is_skipped(tmp_path):
    """Root reads anything: the walk runs in a child without the capabilities that allow it."""
    import os
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("needs root to chown to nobody")
    from test_store_hardening import DROP_DAC, ROOT

    write(tmp_path / "ok.txt", "fine")
    write(tmp_path / "locked" / "in.txt", "hidden")
    write(tmp_path / "secret.txt", "hidden")
    for p in (tmp_path / "locked", tmp_path / "secret.txt"):
        os.chown(p, 65534, 65534)
        p.chmod(0)
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{DROP_DAC}\n"
            "from retrodraft.retrieval.corpus import SkipCounts, iter_documents\n"
            "import json; s = SkipCounts(); print(json.dumps([[d.path for d in iter_documents(sys.argv[1], skipped=s)], s.named]))")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout) == [[str(tmp_path / "ok.txt")],
                                    {"unreadable": [str(tmp_path / "locked"), str(tmp_path / "secret.txt")]}]
