import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrodraft.index.recycling import TokenRecycling, top_k_rows


def best_first_oracle(rows, last, budget, top1_rate, rank_decay):
    """Sorted (cost, rank sum, depth) of the budget best nodes, by scanning every frontier."""
    a, b = -math.log(top1_rate), -math.log(rank_decay)
    chosen = []  # (token, rank sum, depth)
    frontier = [(j, 1, t) for j, t in enumerate(rows[last]) if t >= 0]
    while frontier and len(chosen) < budget:
        key = lambda c: (c[1] * a + c[0] * b, c[0], c[1])  # noqa: E731
        best = min(frontier, key=key)
        frontier.remove(best)
        r, d, t = best
        chosen.append(key(best))
        frontier += [(r + j, d + 1, u) for j, u in enumerate(rows[t]) if u >= 0]
    return sorted(chosen)


def check_tree(rates, rows, last, budget, tokens, parents, scores):
    """Assert a valid draft and return its sorted (cost, rank sum, depth)."""
    n = tokens.shape[0]
    assert tokens.dtype == np.int32 and parents.dtype == np.int32 and scores.dtype == np.float32
    assert n <= budget and parents.shape == scores.shape == (n,)
    a, b = -math.log(rates[0]), -math.log(rates[1])
    depth, rank = np.zeros(n, int), np.zeros(n, int)
    for i in range(n):
        p = int(parents[i])
        assert -1 <= p < i
        parent_token = last if p < 0 else int(tokens[p])
        row = rows[parent_token].tolist()
        assert tokens[i] in row
        depth[i] = 1 if p < 0 else depth[p] + 1
        rank[i] = (0 if p < 0 else rank[p]) + row.index(int(tokens[i]))
        assert scores[i] == np.float32(math.exp(-(depth[i] * a + rank[i] * b)))
        assert p < 0 or scores[i] <= scores[p]
    siblings = set(zip(parents.tolist(), tokens.tolist()))
    assert len(siblings) == n, "a token twice under one parent"
    return sorted(zip((depth * a + rank * b).tolist(), rank.tolist(), depth.tolist()))


@st.composite
def updates(draw):
    vocab, k = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    k = min(k, vocab)
    steps = []
    for _ in range(draw(st.integers(0, 4))):
        m = draw(st.integers(0, 5))
        inputs = draw(st.lists(st.integers(0, vocab - 1), min_size=m, max_size=m))
        topk = [draw(st.permutations(range(vocab)))[:k] for _ in range(m)]
        steps.append((np.array(inputs, np.int64), np.array(topk, np.int64).reshape(m, k)))
    return vocab, k, steps


@settings(max_examples=150, deadline=None)
@given(updates(), st.integers(0, 40), st.sampled_from([(0.5, 0.5), (0.8, 0.3), (1.0, 0.6)]))
def test_rows_and_drafts_match_oracles(upd, budget, rates):
    vocab, k, steps = upd
    rec = TokenRecycling(vocab, k, *rates)
    rows = np.full((vocab, k), -1)
    for inputs, topk in steps:
        rec.update(inputs, topk)
        for t, top in zip(inputs, topk):  # later positions win
            rows[t] = top
    assert np.array_equal(rec.state()["rows"], rows)
    for last in range(vocab):
        tokens, parents, scores = rec.draft(last, budget)
        got = check_tree(rates, rows, last, budget, tokens, parents, scores)
        assert got == best_first_oracle(rows.tolist(), last, budget, *rates)


def test_hand_checked_tree():
    rec = TokenRecycling(4, 2)
    rec.update([0, 1, 2, 0], [[1, 2], [3, 0], [0, 1], [2, 3]])
    # row 0 = [2, 3] (the later position won), row 1 = [3, 0], row 2 = [0, 1], row 3 empty.
    tokens, parents, scores = rec.draft(0, 3)
    # costs (top1 = decay = 1/2: d + r): 2 -> 1, 3 -> 2, 2.0 (child of 2) -> 2; ties go to
    # the lower rank sum, so 2.0 (r = 0) precedes 3 (r = 1)
    assert tokens.tolist() == [2, 0, 3] and parents.tolist() == [-1, 0, -1]
    assert scores.tolist() == [0.5, 0.25, 0.25]
    assert [a.size for a in rec.draft(3, 5)] == [0, 0, 0]
    assert [a.size for a in rec.draft(0, 0)] == [0, 0, 0]


def test_budget_shapes_the_tree():
    rng = np.random.default_rng(0)
    vocab, k = 49152, 8
    rec = TokenRecycling(vocab, k)
    seen = rng.choice(vocab, 300, replace=False)
    rec.update(seen, seen[np.argsort(rng.random((300, 300)), axis=1)[:, :k]])
    last = int(seen[0])
    small, big = rec.draft(last, 4), rec.draft(last, 64)
    assert small[0].size == 4 and big[0].size == 64
    check_tree((0.5, 0.5), rec.state()["rows"], last, 64, *big)
    # a bigger budget only adds nodes: the small tree's scores are the big tree's best
    assert sorted(small[2].tolist()) == sorted(big[2].tolist())[-4:]
    assert rec.state()["rows"].nbytes < 2_000_000


def test_state_roundtrip_read_only():
    rec = TokenRecycling(10, 3)
    rec.update([4, 5], [[1, 2, 3], [6, 7, 8]])
    rows = rec.state()["rows"].copy()
    rows.flags.writeable = False
    back = TokenRecycling.from_state({"rows": rows})
    assert np.array_equal(back.state()["rows"], rows)
    back.update([4], [[9, 9, 9]])
    assert rows[4].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="2-D int32"):
        TokenRecycling.from_state({"rows": rows.astype(np.int64)})
    with pytest.raises(ValueError, match="2-D int32"):
        TokenRecycling.from_state({})
    with pytest.raises(ValueError, match=r"\[-1, 10\)"):
        TokenRecycling.from_state({"rows": np.full((10, 3), 10, np.int32)})


def test_invalid_inputs():
    rec = TokenRecycling(10, 2)
    rec.update([], np.zeros((0, 2), np.int32))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        rec.update([10], [[1, 2]])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        rec.update([1], [[-1, 2]])
    with pytest.raises(ValueError, match="shape"):
        rec.update([1, 2], [[1, 2]])
    with pytest.raises(ValueError, match="2-D integer"):
        rec.update([1], [1, 2])
    with pytest.raises(ValueError, match=r"last_token"):
        rec.draft(10, 4)
    with pytest.raises(ValueError, match=r"last_token"):
        rec.draft(-1, 4)
    with pytest.raises(ValueError, match="budget"):
        rec.draft(1, -1)
    with pytest.raises(ValueError, match="rank_decay"):
        TokenRecycling(10, 2, rank_decay=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        TokenRecycling(0)


def test_ranks_place_a_token_in_the_targets_latest_top_k():
    tr = TokenRecycling(vocab_size=10, k=3)
    tr.update(np.array([1, 2]), np.array([[4, 5, 6], [7, 8, 9]]))
    after = np.array([1, 1, 1, 2, 3])
    tokens = np.array([4, 6, 9, 8, 4])
    # top-1, third, absent from row 1; second in row 2; row 3 never filled
    assert tr.ranks(after, tokens).tolist() == [0, 2, 3, 1, -1]


@pytest.mark.parametrize("rows, vocab, k", [(1, 8, 8), (3, 50, 8), (17, 49152, 8), (2, 1000, 1), (5, 33, 4)])
def test_top_k_rows_are_torch_topk(rows, vocab, k):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(rows * vocab).standard_normal((rows, vocab)).astype(np.float32)
    out = np.full((rows, k), -7, np.int64)
    top_k_rows(x, out)
    assert np.array_equal(out, torch.from_numpy(x).topk(k, dim=-1).indices.numpy())


def test_top_k_rows_keep_the_lower_column_first_among_equal_values():
    x = np.zeros((2, 70), np.float32)
    x[0, 50] = 1.0
    x[1, 60:70] = -np.inf  # never enter past the first k
    out = np.empty((2, 4), np.int64)
    top_k_rows(x, out)
    assert out.tolist() == [[50, 0, 1, 2], [0, 1, 2, 3]]
