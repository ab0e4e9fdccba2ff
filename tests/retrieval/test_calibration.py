import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from retrodraft.index.recycling import TokenRecycling
from retrodraft.retrieval.calibration import Calibrator, verdicts
from retrodraft.retrieval.tree import DraftTree


def chain(tokens, score):
    n = len(tokens)
    return DraftTree.build(tokens, np.arange(n) - 1, np.full(n, score))


def test_converges_to_a_known_acceptance_rate():
    """A source that always claims 0.9 but whose first token is right 30% of the time."""
    rng = np.random.default_rng(0)
    cal = Calibrator()
    for _ in range(3000):
        tree = chain([5], 0.9)
        emitted = np.array([5 if rng.random() < 0.3 else 6], np.int32)
        cal.observe(tree, "src", emitted)
    assert abs(float(cal.calibrate(chain([5], 0.9), "src").scores[0]) - 0.3) < 0.03


def test_outcomes_are_learned_only_where_the_emitted_tokens_decide():
    cal = Calibrator()
    tree = DraftTree.build([1, 2, 3, 9], [-1, 0, 1, -1], [0.9, 0.8, 0.7, 0.5])
    cal.observe(tree, "src", np.array([1, 2], np.int32))  # node 2 (depth 3) is undecided
    assert cal.seen.sum() == 3 and cal.hits.sum() == 2
    cal.observe(tree, "src", np.array([4], np.int32))  # everything below a wrong first token is wrong
    assert cal.seen.sum() == 7 and cal.hits.sum() == 2


def test_untrained_calibration_keeps_raw_scores_and_state_round_trips():
    tree = DraftTree.build([1, 2], [-1, 0], [0.6, 0.4])
    cal = Calibrator()
    np.testing.assert_allclose(cal.calibrate(tree, "a").scores, [0.6, 0.4], rtol=1e-6)
    cal.observe(tree, "a", np.array([1, 7], np.int32))
    again = Calibrator.from_state({k: v.copy() for k, v in cal.state().items()})
    np.testing.assert_array_equal(again.calibrate(tree, "a").scores, cal.calibrate(tree, "a").scores)
    assert cal.report()[0][0] == "a"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=40))
def test_calibrated_scores_are_probabilities_and_stay_monotone_down_a_path(events):
    cal = Calibrator()
    for score, tok, truth in events:
        tree = DraftTree.build([tok, tok], [-1, 0], [score, score * 0.5])
        cal.observe(tree, "s", np.array([truth, truth], np.int32))
        out = cal.calibrate(tree, "s")
        assert np.all((out.scores >= 0) & (out.scores <= 1))
        assert out.scores[1] <= out.scores[0]
        out.validate()


def test_the_recycling_verdict_separates_what_the_target_ranks_first_from_what_it_never_ranked():
    """RASD-style: the same raw score, right 80% of the time when the target's recent top-1
    agrees and 10% when it never ranked the token, is calibrated to each rate."""
    rng = np.random.default_rng(1)
    cal = Calibrator()
    top1, absent = np.array([1]), np.array([3])
    for _ in range(2000):
        for verdict, rate in ((top1, 0.8), (absent, 0.1)):
            emitted = np.array([5 if rng.random() < rate else 6], np.int32)
            cal.observe(chain([5], 0.5), "src", emitted, verdict, np.array([0.5]))
    assert abs(float(cal.calibrate(chain([5], 0.5), "src", top1).scores[0]) - 0.8) < 0.03
    assert abs(float(cal.calibrate(chain([5], 0.5), "src", absent).scores[0]) - 0.1) < 0.03
    ece, bins = cal.calibration_error()
    assert bins == [(0.5, pytest.approx(0.45, abs=0.03), 4000)] and ece == pytest.approx(0.05, abs=0.03)


def test_verdicts_read_the_recycling_matrix_along_the_tree():
    tr = TokenRecycling(vocab_size=10, k=2)
    tr.update(np.array([1, 4]), np.array([[4, 5], [7, 8]]))
    tree = DraftTree.build([4, 7, 9, 5], [-1, 0, 0, -1], [0.5, 0.4, 0.3, 0.2])
    # after the last token 1: 4 is top-1, 5 second; after 4: 7 top-1, 9 absent
    assert verdicts(tree, 1, tr).tolist() == [1, 1, 3, 2]
    assert verdicts(tree, 2, tr).tolist() == [0, 1, 3, 0]  # row 2 was never filled
    assert verdicts(tree, 1, None) is None


def test_state_saved_before_verdicts_seeds_every_verdict():
    cal = Calibrator()
    for _ in range(50):
        cal.observe(chain([5], 0.9), "src", np.array([6], np.int32))
    old = {k: (v[:, 0] if v.ndim == 4 else v) for k, v in cal.state().items()}  # the layout without verdicts
    again = Calibrator.from_state(old)
    for verdict in range(4):
        assert again.calibrate(chain([5], 0.9), "src", np.array([verdict])).scores[0] < 0.2


def test_per_node_sources_are_calibrated_apart():
    """A fused tree's nodes are calibrated by the set of sources that agree on each: the
    same raw score, right always when both sources agree and never when one is alone."""
    cal = Calibrator()
    tree = DraftTree.build([5, 6], [-1, -1], [0.5, 0.5])
    names = ["fused:a+b", "fused:a"]
    for _ in range(200):
        cal.observe(tree, names, np.array([5], np.int32))
    out = cal.calibrate(tree, names).scores
    assert out[0] > 0.95 and out[1] < 0.05
    assert set(cal.names) == set(names)
