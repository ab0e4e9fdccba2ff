import numpy as np
from hypothesis import given, settings, strategies as st

from retrieval.calibration import Calibrator
from retrieval.tree import DraftTree


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
