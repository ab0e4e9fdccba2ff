import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrodraft.index.knn import _widen, search, search_rows


def oracle(keys, queries, k, metric, rows=None):
    """(ids, scores) by float64 numpy: best first, ties to the lower row id."""
    rows = np.arange(keys.shape[0]) if rows is None else np.unique(rows)
    kf, x = keys[rows].astype(np.float64), queries.astype(np.float64)
    if metric == "ip":
        good = x @ kf.T
    else:
        good = -((x[:, None, :] - kf[None]) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(rows, good.shape), -good), axis=-1)[:, :k]
    scores = np.take_along_axis(good, order, -1)
    return rows[order], (-scores if metric == "l2" else scores)


@st.composite
def problems(draw):
    n, d, q = draw(st.integers(0, 300)), draw(st.integers(1, 12)), draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # small integers: every score is exact in fp32, so ties are real and must go to lower ids
    keys = rng.integers(-4, 5, (n, d)).astype(np.float16)
    queries = rng.integers(-4, 5, (q, d)).astype(np.float32)
    return keys, queries, draw(st.integers(0, n + 3)), draw(st.sampled_from(["ip", "l2"])), rng


@settings(max_examples=150, deadline=None)
@given(problems())
def test_exact_top_k_matches_numpy(p):
    keys, queries, k, metric, _ = p
    ids, scores = search(keys, queries, k, metric)
    want_ids, want_scores = oracle(keys, queries, k, metric)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    assert ids.shape == scores.shape == (queries.shape[0], min(k, keys.shape[0]))
    assert np.array_equal(ids, want_ids) and np.array_equal(scores, want_scores)


@settings(max_examples=150, deadline=None)
@given(problems(), st.integers(0, 40))
def test_restricted_search_matches_numpy(p, m):
    keys, queries, k, metric, rng = p
    rows = rng.integers(0, keys.shape[0], m) if keys.shape[0] else np.empty(0, np.int64)
    ids, scores = search_rows(keys, queries, rows, k, metric)
    want_ids, want_scores = oracle(keys, queries, k, metric, rows)
    assert np.array_equal(ids, want_ids) and np.array_equal(scores, want_scores)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_parallel_chunks_exact(metric):
    rng = np.random.default_rng(1)
    keys = rng.integers(-4, 5, (9000, 8)).astype(np.float16)  # several parallel chunks
    queries = rng.integers(-4, 5, (3, 8)).astype(np.float32)
    for rows in (None, rng.integers(0, 9000, 6000)):
        got = search(keys, queries, 50, metric) if rows is None else search_rows(
            keys, queries, rows, 50, metric
        )
        want = oracle(keys, queries, 50, metric, rows)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    serial = search(keys, queries, 50, metric, parallel=False)
    want = oracle(keys, queries, 50, metric)
    assert np.array_equal(serial[0], want[0]) and np.array_equal(serial[1], want[1])


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_float_keys_within_rounding(metric):
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((3000, 64)).astype(np.float16)
    queries = rng.standard_normal((4, 64))
    ids, scores = search(keys, queries, 10, metric)
    x = queries.astype(np.float32)
    _, want = oracle(keys, x, 10, metric)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-4)
    # each id scores as reported (near-ties may swap under float32 rounding)
    picked = keys[ids].astype(np.float64)  # [q, k, d]
    if metric == "ip":
        true = np.einsum("qd,qkd->qk", x.astype(np.float64), picked)
    else:
        true = ((x.astype(np.float64)[:, None, :] - picked) ** 2).sum(-1)
    np.testing.assert_allclose(scores, true, rtol=1e-5, atol=1e-4)


def test_widen_is_exact_for_every_half():
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    bits = np.empty(65536, np.uint32)
    _widen(h, bits)
    want = h.view(np.float16).astype(np.float32)
    finite = np.isfinite(want)
    assert np.array_equal(bits[finite], want.view(np.uint32)[finite])
    assert np.array_equal(np.isnan(bits.view(np.float32)), np.isnan(want))
    assert np.array_equal(bits.view(np.float32)[np.isinf(want)], want[np.isinf(want)])


def test_nan_scores_count_as_worst():
    keys = np.array([[np.nan, 1], [1, 1], [np.inf, 0], [2, 2]], np.float16)
    ids, scores = search(keys, [[1.0, 1.0]], 4, "ip")
    assert ids.tolist() == [[2, 3, 1, 0]] and scores[0, 3] == -np.inf
    ids, scores = search(keys, [[1.0, 1.0]], 4, "l2")
    # inf and nan rows are both infinitely far: tie, lower id first
    assert ids.tolist() == [[1, 3, 0, 2]] and scores[0, 0] == 0 and scores[0, 3] == np.inf


def test_edge_cases_and_errors():
    keys = np.ones((5, 3), np.float16)
    assert search(keys, np.ones((2, 3)), 0)[0].shape == (2, 0)
    assert search(keys, np.ones((0, 3)), 4)[0].shape == (0, 4)
    assert search(np.ones((0, 3), np.float16), np.ones((2, 3)), 4)[0].shape == (2, 0)
    ids, scores = search(keys, np.ones((1, 3)), 10)
    assert ids.tolist() == [[0, 1, 2, 3, 4]] and scores.tolist() == [[3.0] * 5]
    assert search_rows(keys, np.ones((1, 3)), [], 3)[0].shape == (1, 0)
    assert search_rows(keys, np.ones((1, 3)), [4, 4, 2], 3)[0].tolist() == [[2, 4]]
    with pytest.raises(ValueError, match="float16"):
        search(keys.astype(np.float32), np.ones((1, 3)), 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        search(np.ones((3, 5), np.float16).T, np.ones((1, 3)), 1)
    with pytest.raises(ValueError, match=r"\[q, 3\]"):
        search(keys, np.ones((1, 4)), 1)
    with pytest.raises(ValueError, match=r"\[q, 3\]"):
        search(keys, np.ones(3), 1)
    with pytest.raises(ValueError, match="finite"):
        search(keys, [[np.nan, 0, 0]], 1)
    with pytest.raises(ValueError, match="k must"):
        search(keys, np.ones((1, 3)), -1)
    with pytest.raises(ValueError, match="metric"):
        search(keys, np.ones((1, 3)), 1, "cosine")
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        search_rows(keys, np.ones((1, 3)), [5], 1)
    with pytest.raises(ValueError, match="1-D integer"):
        search_rows(keys, np.ones((1, 3)), [[1]], 1)
