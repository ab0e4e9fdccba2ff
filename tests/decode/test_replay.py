"""Replay of recorded traces predicts a real run's acceptance exactly."""

import numpy as np
import pytest
import torch

from retrodraft.decode import generate
from retrodraft.decode.replay import load_traces, replay, replay_all
from retrodraft.index.suffix_tree import SuffixTree
from retrodraft.retrieval.drafters import PromptLookupDrafter, SuffixDrafter


def drafters(tree):
    return [PromptLookupDrafter(), SuffixDrafter(tree)]


@pytest.fixture(scope="module")
def traces(shared_dir):
    return load_traces(shared_dir / "data" / "traces" / "smollm2_specbench_dev.jsonl")


@pytest.mark.model
@pytest.mark.parametrize("budget", [6, 24])
def test_replay_equals_a_real_run(smollm, traces, budget):
    model, _ = smollm
    picked = sorted(traces, key=lambda t: len(t.output))[:3:1]  # the shortest, to keep it fast
    real_tree, replay_tree = SuffixTree(max_depth=32), SuffixTree(max_depth=32)
    for t in picked:
        ids = torch.from_numpy(t.prompt.astype(np.int64))[None]
        out = generate(model, ids, max_new_tokens=len(t.output), drafters=drafters(real_tree), budget=budget,
                       eos_token_id=[])
        assert out.sequences[0, len(t.prompt):].tolist() == t.output.tolist()
        steps, new, _ = replay(t, drafters(replay_tree), budget=budget)
        assert (steps, new) == (out.stats.steps, out.stats.new_tokens)


def test_replay_reports_every_category_and_beats_one_token_per_step(traces):
    tree = SuffixTree(max_depth=32)
    result = replay_all(traces, lambda: drafters(tree), budget=16)
    assert set(result) == {t.category for t in traces} | {"overall"}
    assert result["overall"][0] > 1.5


def test_replay_needs_a_budget_or_a_cost_table(traces):
    with pytest.raises(ValueError, match="budget"):
        replay(traces[0], drafters(SuffixTree()), budget=None)


def test_replay_with_the_cost_model_counts_its_own_drafting_time(tmp_path, monkeypatch):
    from conftest import tiny_model
    from retrodraft.decode.budget import CostModel
    from retrodraft.decode.replay import Trace

    monkeypatch.setenv("RETRODRAFT_CACHE", str(tmp_path))
    monkeypatch.setattr("retrodraft.decode.budget.ROUNDS", 2)
    monkeypatch.setattr("retrodraft.decode.budget.RETRIES", 0)
    costs = CostModel(tiny_model("llama"))
    text = np.tile(np.arange(10, 30, dtype=np.int32), 6)
    trace = Trace("t", "cat", text[:40], text[40:], np.repeat(text[40:, None], 8, axis=1))
    steps, new, cost = replay(trace, [PromptLookupDrafter()], costs=costs)
    assert new == 80 and steps < new  # the repeats are drafted and accepted
    d = costs.overhead("replay:prompt_lookup")
    assert d[0] > 0  # drafting took time, in units of a 0-node forward
    assert cost > steps  # each step is at least one 0-node forward (c(0) = 1), plus its drafting time
    assert len(costs._hosts["replay:prompt_lookup"].window) == steps - 1  # the first step is counted, not taught
