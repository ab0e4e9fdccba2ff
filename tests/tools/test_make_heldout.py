"""tools/make_heldout.py: a held-out question file from the stdlib, in Spec-Bench's schema."""

import json

import pytest

from retrodraft.tools import bench, make_heldout


def test_writes_three_groups_that_bench_reads(tmp_path):
    out = tmp_path / "q.jsonl"
    make_heldout.main(["--out", str(out), "--per-group", "3"])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [q["category"] for q in written] == ["code_edit"] * 3 + ["doc_question"] * 3 + ["records"] * 3
    assert len({q["question_id"] for q in written}) == 9
    assert "```python\ndef " in written[0]["turns"][0]
    assert written[6]["turns"][0].count("\n") >= 9  # header + 8 records
    loaded = bench.load_questions(out, None, 2)
    assert [q["group"] for q in loaded] == ["code_edit"] * 2 + ["doc_question"] * 2 + ["records"] * 2
    assert make_heldout.questions(3) == written  # deterministic


def test_the_committed_file_has_ten_per_group():
    written = [json.loads(line) for line in make_heldout.OUT.read_text().splitlines()]
    assert {c: sum(q["category"] == c for q in written) for c in ("code_edit", "doc_question", "records")} == {
        "code_edit": 10, "doc_question": 10, "records": 10}


def test_a_bad_group_size_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit):
        make_heldout.main(["--out", str(tmp_path / "q.jsonl"), "--per-group", "0"])
