"""tools/bench.py end to end on the real model: record traces, replay them, time every method."""

import json

import numpy as np
import pytest

from retrodraft.decode.replay import load_traces
from retrodraft.retrieval.config import SpeculationConfig
from retrodraft.tools import bench

QUESTIONS = [
    {"question_id": 1, "category": "summarization",
     "turns": ["Summarize: The cat sat on the mat. The cat was happy on the mat all day."]},
    {"question_id": 2, "category": "writing", "turns": ["Write one sentence about the sea.", "Now make it shorter."]},
]


@pytest.fixture()
def questions(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


@pytest.mark.model
def test_record_replay_and_run(tmp_path, questions, capsys):
    traces = tmp_path / "traces.jsonl"
    bench.main(["record", "--questions", str(questions), "--max-new-tokens", "12", "--out", str(traces)])
    recorded = load_traces(traces)
    # the MT-bench question has two turns, the second including the first answer
    assert [(t.qid, t.category) for t in recorded] == [("1", "summarization"), ("2", "mt_bench"), ("2-2", "mt_bench")]
    assert len(recorded[2].prompt) > len(recorded[1].prompt) + len(recorded[1].output)
    for t in recorded:
        assert t.topk.shape == (len(t.output), 8)
        np.testing.assert_array_equal(t.topk[:, 0], t.output)  # greedy: the output is the top-1

    bench.main(["replay", str(traces), "--budgets", "4", "--drafters", "prompt_lookup,suffix"])
    table = capsys.readouterr().out
    assert "prompt_lookup+suffix" in table and "overall" in table

    out = tmp_path / "results.json"
    bench.main(["--questions", str(questions), "--max-new-tokens", "12", "--warmup", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    results = saved["results"]
    assert list(results) == ["vanilla", "prompt_lookup", "no_drafts", "drafter:prompt_lookup", "drafter:suffix",
                             "drafter:ngram", "drafter:recycling", "retrodraft"]
    for method in results.values():
        assert set(method) == {"mt_bench", "summarization", "overall"}
        for cell in method.values():
            assert cell["identical"] is True
            assert set(cell) == {"speedup", "tokens_per_s", "mean_accepted", "identical", "prediction_error"}
            assert cell["mean_accepted"] >= 1.0
    assert results["vanilla"]["overall"]["prediction_error"] is None  # not driven by the cost model
    assert 0.0 <= results["retrodraft"]["overall"]["prediction_error"] < 10.0
    assert saved["cost_model"]["buckets"] and "retrodraft" not in saved["cost_model"]["overhead"]
    assert any(key.startswith("prompt_lookup") for key in saved["cost_model"]["overhead"])
    assert results["vanilla"]["overall"]["speedup"] == pytest.approx(1.0)
    assert results["vanilla"]["overall"]["mean_accepted"] == pytest.approx(1.0)
    assert 0.0 <= saved["calibration"]["expected_calibration_error"] <= 1.0
    # the results say how they were run
    assert saved["settings"]["config"] == json.loads(json.dumps(SpeculationConfig().as_dict()))
    assert saved["settings"]["config"]["max_nodes"] == SpeculationConfig().cost_sizes[-1]
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_missing_questions_file_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no questions"):
        bench.main(["--questions", str(tmp_path / "none.jsonl")])


def test_a_negative_hog_count_is_a_clear_error(questions):
    with pytest.raises(SystemExit):
        bench.main(["--questions", str(questions), "--hog", "-1"])


@pytest.mark.parametrize("command", ["run", "record"])
def test_no_tokens_to_generate_is_a_clear_error(questions, command, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main([command, "--questions", str(questions), "--max-new-tokens", "0", "--out", str(tmp_path / "x")])
    assert "--max-new-tokens must be 1 or more" in capsys.readouterr().err


def test_the_demo_refuses_no_tokens_to_generate(capsys):
    from retrodraft.tools import demo

    with pytest.raises(SystemExit):
        demo.main(["--max-new-tokens", "-5"])
    assert "--max-new-tokens must be 1 or more" in capsys.readouterr().err


def test_cpu_hogs_are_started_and_stopped():
    with bench.cpu_hogs(2) as hogs:
        assert len(hogs) == 2 and all(h.poll() is None for h in hogs)  # spinning
    assert all(h.poll() is not None for h in hogs)  # killed and reaped
    with bench.cpu_hogs(0) as hogs:
        assert hogs == []


def _results(tmp_path, fused_seconds: float):
    """A run's JSON with two groups of two questions: singles at 2x and 3x vanilla, no_drafts
    at 1.5x, the fused engine at 10 / fused_seconds tokens/s (vanilla 1 tok/s)."""
    records = []
    for qid, group in ((1, "a"), (2, "a"), (3, "b"), (4, "b")):
        rec = {"qid": qid, "group": group}
        for m, seconds in (("vanilla", 10.0), ("no_drafts", 10 / 1.5), ("drafter:x", 5.0), ("drafter:y", 10 / 3),
                           ("retrodraft", fused_seconds)):
            rec[m] = {"tokens": 10, "seconds": seconds, "steps": 5, "identical": True, "step_errors": []}
        records.append(rec)
    names = ["vanilla", "no_drafts", "drafter:x", "drafter:y", "retrodraft"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"results": bench.summarize(records, names), "records": records}))
    return path


def test_compare_reports_the_fused_engine_against_its_best_single_drafter(tmp_path, capsys):
    bench.main(["compare", str(_results(tmp_path, fused_seconds=2.5)), "--resamples", "50"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"a", "b", "overall"}
    # fused 4x, best single drafter:y at 3x: ratio 1.33, no spread between questions; share 4 / 1.5
    assert rows["overall"] == ["overall", "4.00x", "drafter:y", "3.00x", "1.33", "1.33-1.33", "2.67"]


def test_compare_refuses_files_it_cannot_read(tmp_path):
    with pytest.raises(SystemExit, match="not a results file"):
        bench.main(["compare", str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": {"vanilla": {}}, "records": []}))
    with pytest.raises(SystemExit, match="no retrodraft"):
        bench.main(["compare", str(bad)])
    with pytest.raises(SystemExit):
        bench.main(["compare", str(_results(tmp_path, 2.5)), "--confidence", "1.5"])


@pytest.mark.model
def test_longest_context_bounds_every_turn_a_run_can_reach(smollm):
    """bench warms only the cost curves up to this bound: a context past it would be measured
    mid-run, inside the timings. Each turn's context is its prompt (with the earlier answers,
    tokenized again from their text) and its own answer."""
    _, tok = smollm
    max_new = 40
    answer_ids = tok.encode("Waves fold over the pier; the tide keeps its own time. " * 8)[:max_new]
    for q in QUESTIONS:
        q = {**q, "group": "mt_bench" if q["category"] in bench.MT_BENCH else q["category"]}
        bound = bench.longest_context([q], tok, max_new)
        contexts = [ids.shape[1] + max_new for ids in bench.turns(q, tok, lambda ids: answer_ids)]
        assert len(contexts) == len(bench.asked(q)) and max(contexts) <= bound
