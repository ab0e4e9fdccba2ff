"""The public Speculator driven by a loop of its own, without torch, and its settings."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from retrodraft.index.recycling import TokenRecycling
from retrodraft.retrieval import DraftTree, PromptLookupDrafter, SpeculationConfig, Speculator
from retrodraft.retrieval.drafters import RecyclingDrafter, ReferenceDrafter

# A "target" that continues with this text, whatever it is shown: the answer repeats itself,
# so prompt lookup has something to copy, and a reference holds part of it.
ANSWER = np.array([5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7], np.int32)
PROMPT = np.array([1, 2, 3, 4], np.int32)


class Recorder:
    """A drafter that proposes nothing and records what observe() hands it."""

    name = "recorder"
    needs_topk = False
    needs_hidden = True

    def __init__(self):
        self.seen = []

    def propose(self, context, budget):
        return DraftTree.empty()

    def observe(self, context, accepted, topk, hidden=None):
        self.seen.append((accepted.copy(), None if hidden is None else hidden.copy()))


def outside_loop(spec: Speculator, hidden_size: int = 0) -> tuple[np.ndarray, int]:
    """Greedy verification against ANSWER, the way a serving engine would drive a Speculator:
    propose, check the tree against the target, emit, observe."""
    tokens = np.concatenate([PROMPT, ANSWER])
    length, end, steps = len(PROMPT), len(tokens), 0
    while length < end:
        tree = spec.propose(tokens[:length], room=end - length)
        node, emitted = -1, 0
        while True:  # walk the tree along the target's continuation
            want = tokens[length + emitted]
            kids = np.flatnonzero((tree.parents == node) & (tree.tokens == want))
            emitted += 1  # the matched node, or the target's own token when none matched
            if not len(kids) or length + emitted == end:
                break
            node = int(kids[0])
        # hidden rows stand in for the forward's last hidden state: row r holds r
        hidden = np.arange(len(tree) + 1, dtype=np.float32)[:, None].repeat(hidden_size, 1) if hidden_size else None
        length += emitted
        steps += 1
        spec.observe(tokens[:length], emitted, hidden=hidden)
    return tokens[len(PROMPT):length], steps


def test_an_outside_loop_accepts_drafts_and_gets_spans():
    ref = ReferenceDrafter([np.concatenate([[0, 0], PROMPT, ANSWER[:12]])], names=["notes"])
    spec = Speculator([PromptLookupDrafter(), ref], budget=8)
    out, steps = outside_loop(spec)
    assert np.array_equal(out, ANSWER)
    assert steps < len(ANSWER) / 2  # drafts were accepted, several per step
    assert spec.accepted["reference"] >= 10 and spec.accepted["prompt_lookup"] > 0
    # the reference's copy is attributed: positions among the new tokens, offset in the document
    span = max(spec.spans, key=lambda s: s.length)
    assert (span.source, span.document, span.start, span.offset) == ("reference", "notes", 0, 6)
    assert span.length >= 10


def test_hidden_rows_reach_drafters_that_ask_aligned_with_the_emitted_tokens():
    rec = Recorder()
    spec = Speculator([PromptLookupDrafter(), rec], budget=8)
    outside_loop(spec, hidden_size=3)
    for accepted, hidden in rec.seen:
        assert hidden.shape == (len(accepted), 3)
        assert hidden[0, 0] == 0  # the root's row predicts the first new token
    assert any(len(a) > 1 for a, _ in rec.seen)


def test_automatic_budget_needs_a_cost_and_uses_it():
    with pytest.raises(ValueError, match="cost table"):
        Speculator([PromptLookupDrafter()])
    free = np.ones(65)  # verification costs nothing extra: every candidate is worth sending
    dear = np.concatenate(([1.0], np.full(64, 100.0)))  # any draft costs a hundred forwards
    ctx = np.concatenate([PROMPT, ANSWER[:12]])
    assert len(Speculator([PromptLookupDrafter()], cost=free).propose(ctx)) > 0
    assert len(Speculator([PromptLookupDrafter()], cost=lambda n: dear).propose(ctx)) == 0


def test_misuse_gets_clear_errors():
    spec = Speculator([PromptLookupDrafter()], budget=4)
    with pytest.raises(RuntimeError, match="follows propose"):
        spec.observe(PROMPT, 1)
    with pytest.raises(ValueError, match="at most 8"):
        Speculator([PromptLookupDrafter() for _ in range(9)], budget=4)
    with pytest.raises(ValueError, match="budget must be an int"):
        Speculator([PromptLookupDrafter()], budget=-1)
    with pytest.raises(ValueError, match="topk=4"):
        Speculator([RecyclingDrafter(TokenRecycling(64, k=8))], budget=4, config=SpeculationConfig(topk=4))
    with pytest.raises(ValueError, match="cost_sizes must start at 0"):
        SpeculationConfig(cost_sizes=(1, 2))


def test_room_bounds_the_tree_depth():
    spec = Speculator([PromptLookupDrafter()], budget=16)
    ctx = np.concatenate([PROMPT, ANSWER[:12]])
    assert spec.propose(ctx).depths().max() > 2
    assert spec.propose(ctx, room=3).depths().max() == 2  # two drafts + the bonus token fit
    assert len(spec.propose(ctx, room=1)) == 0


def test_the_speculator_and_its_config_import_no_torch():
    code = ("import sys; sys.path.insert(0, %r); import retrodraft.retrieval.speculator; "
            "print('torch' in sys.modules)" % str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_drafter_proposing_a_malformed_tree_gets_a_clear_error_naming_it():
    class Broken:
        name, needs_topk = "broken", False

        def __init__(self, tree):
            self.tree = tree

        def propose(self, context, budget):
            return self.tree

        def observe(self, context, accepted, topk):
            pass

    ctx = np.concatenate([PROMPT, ANSWER[:12]])
    forward_parent = DraftTree(np.array([5, 6], np.int32), np.array([1, -1], np.int32), np.ones(2, np.float32),
                               np.zeros(2, np.uint8), np.full(2, -1, np.int64))
    for tree, error, match in ((forward_parent, ValueError, "'broken' proposed an invalid tree.*parent"),
                               ([5, 6], TypeError, "'broken' proposed a list")):
        spec = Speculator([PromptLookupDrafter(), Broken(tree)], budget=8)
        with pytest.raises(error, match=match):
            spec.propose(ctx)
