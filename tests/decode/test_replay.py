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
