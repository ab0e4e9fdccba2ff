"""SuffixTree against a brute-force oracle: counts, match, draft, eviction, state."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrodraft.index.suffix_tree import SuffixTree

VOCAB = 4  # small, so paths repeat and nodes get several children

seq_st = st.lists(st.integers(0, VOCAB - 1), max_size=25)
seqs_st = st.lists(seq_st, max_size=5)
depth_st = st.integers(1, 6)


def oracle(seqs, depth):
    """Counter: path tuple -> number of suffixes (cut to depth) starting with it."""
    c = Counter()
    for s in seqs:
        for i in range(len(s)):
            for d in range(1, min(depth, len(s) - i) + 1):
                c[tuple(s[i : i + d])] += 1
    return c


def assert_counts(tree, seqs):
    c = oracle(seqs, tree.max_depth)
    assert tree.num_nodes == len(c)
    assert len(tree) == sum(len(s) for s in seqs)
    assert tree.count([]) == len(tree)
    for path, n in c.items():
        assert tree.count(list(path)) == n, path


def oracle_match(c, context, max_len):
    for m in range(min(max_len, len(context)), 0, -1):
        if tuple(context[-m:]) in c:
            return m
    return 0


def build(seqs, depth, max_tokens=1 << 20):
    tree = SuffixTree(max_depth=depth, max_tokens=max_tokens)
    for s in seqs:
        tree.add_sequence(s)
    return tree


@settings(max_examples=150, deadline=None)
@given(seqs_st, depth_st)
def test_counts_equal_brute_force(seqs, depth):
    assert_counts(build(seqs, depth), seqs)


@settings(max_examples=100, deadline=None)
@given(seqs_st, depth_st, st.data())
def test_interleaved_appends_equal_whole_sequences(seqs, depth, data):
    tree = SuffixTree(max_depth=depth)
    ids = [tree.add_sequence() for _ in seqs]
    pos = [0] * len(seqs)
    while any(p < len(s) for p, s in zip(pos, seqs)):
        i = data.draw(st.sampled_from([i for i, s in enumerate(seqs) if pos[i] < len(s)]))
        k = data.draw(st.integers(1, len(seqs[i]) - pos[i]))
        tree.append(ids[i], seqs[i][pos[i] : pos[i] + k])
        pos[i] += k
    assert_counts(tree, seqs)


@settings(max_examples=150, deadline=None)
@given(seqs_st, depth_st, st.lists(st.integers(0, VOCAB), max_size=12), st.integers(0, 8))
def test_match_is_longest_stored_suffix(seqs, depth, context, max_len):
    tree = build(seqs, depth)
    c = oracle(seqs, depth)
    node, m = tree.match(context)
    assert m == oracle_match(c, context, depth)
    assert (node == 0) == (m == 0)
    assert tree.match(context, max_len=max_len)[1] == oracle_match(c, context, min(max_len, depth))


@settings(max_examples=150, deadline=None)
@given(
    seqs_st, depth_st, st.lists(st.integers(0, VOCAB), max_size=8),
    st.integers(0, 12), st.sampled_from([0.0, 0.1, 0.3]), st.integers(1, 6),
)
def test_draft_is_top_budget_of_count_ratios(seqs, depth, context, budget, min_prob, max_match):
    tree = build(seqs, depth)
    c = oracle(seqs, depth)
    tokens, parents, scores, m = tree.draft(context, budget, min_prob=min_prob, max_match=max_match)
    assert m == oracle_match(c, context, min(max_match, depth))
    assert tokens.dtype == np.int32 and parents.dtype == np.int32 and scores.dtype == np.float32
    n = tokens.shape[0]
    assert parents.shape == scores.shape == (n,) and n <= budget
    if m == 0:
        assert n == 0
        return
    base = tuple(context[len(context) - m :])

    def score(path):
        s = 1.0
        for i in range(len(path)):
            s = s * c[base + path[: i + 1]] / c[base + path[:i]]
        return s

    eligible = [p[m:] for p in c if len(p) > m and p[:m] == base]
    want = sorted((score(p) for p in eligible if score(p) >= min_prob), reverse=True)[:budget]
    assert n == len(want)
    np.testing.assert_allclose(np.sort(scores)[::-1], want, rtol=1e-6)
    paths = []
    for i in range(n):
        assert -1 <= parents[i] < i
        path = (paths[parents[i]] if parents[i] >= 0 else ()) + (int(tokens[i]),)
        paths.append(path)
        assert base + path in c
        assert scores[i] == pytest.approx(score(path), rel=1e-6)
    assert len(set(paths)) == n


def simulate(ops, depth, max_tokens):
    """Run ops on a tree and on the eviction policy in plain Python; return both."""
    tree = SuffixTree(max_depth=depth, max_tokens=max_tokens)
    live = {}  # id -> surviving tokens, oldest first
    for op, arg, toks in ops:
        if op == "add" or not live:
            sid = tree.add_sequence()
            live[sid] = []
        else:
            sid = list(live)[arg % len(live)]
        if op == "remove":
            tree.remove(sid)
            del live[sid]
            continue
        tree.append(sid, toks)
        excess = sum(map(len, live.values())) + len(toks) - max_tokens
        for other in [i for i in live if i != sid]:
            if excess <= 0:
                break
            excess -= len(live.pop(other))
        live[sid] = (live[sid] + toks)[max(excess, 0) :]
        assert len(tree) <= max_tokens
    return tree, live


ops_st = st.lists(
    st.tuples(st.sampled_from(["add", "append", "append", "remove"]), st.integers(0, 9), seq_st),
    max_size=20,
)


@settings(max_examples=150, deadline=None)
@given(ops_st, depth_st, st.integers(1, 40))
def test_eviction_keeps_budget_and_equals_rebuild(ops, depth, max_tokens):
    tree, live = simulate(ops, depth, max_tokens)
    assert tree.live_sequences() == {i: len(s) for i, s in live.items()}
    assert_counts(tree, list(live.values()))


@settings(max_examples=100, deadline=None)
@given(seqs_st, depth_st, st.integers(0, 4))
def test_remove_then_readd_gives_same_counts(seqs, depth, victim):
    tree = build(seqs, depth)
    if not seqs:
        return
    victim %= len(seqs)
    tree.remove(victim)
    rest = seqs[:victim] + seqs[victim + 1 :]
    assert_counts(tree, rest)
    tree.add_sequence(seqs[victim])
    assert_counts(tree, seqs)


@settings(max_examples=50, deadline=None)
@given(ops_st, depth_st, st.lists(seq_st, min_size=1, max_size=5))
def test_state_round_trip_gives_identical_drafts(ops, depth, contexts):
    tree, _ = simulate(ops, depth, 60)
    state = {k: v.copy() for k, v in tree.state().items()}
    for a in state.values():
        a.flags.writeable = False
    loaded = SuffixTree.from_state(state)
    assert loaded.live_sequences() == tree.live_sequences()
    for ctx in contexts:
        for x, y in zip(tree.draft(ctx, 10), loaded.draft(ctx, 10)):
            np.testing.assert_array_equal(x, y)
    # the loaded tree keeps working: append to it and to the original alike
    for t in (tree, loaded):
        sid = t.add_sequence(contexts[0])
        t.append(next(iter(t.live_sequences())), [1, 2, 3])
    assert tree.live_sequences() == loaded.live_sequences()
    assert tree.num_nodes == loaded.num_nodes
    for ctx in contexts:
        for x, y in zip(tree.draft(ctx, 10), loaded.draft(ctx, 10)):
            np.testing.assert_array_equal(x, y)
    assert sid in loaded


def test_loading_an_empty_tree_then_appending_does_not_hang():
    loaded = SuffixTree.from_state(SuffixTree(max_depth=2).state())
    loaded.add_sequence([1, 2, 1])
    assert_counts(loaded, [[1, 2, 1]])


def test_hand_checked_draft():
    tree = SuffixTree(max_depth=4)
    tree.add_sequence([1, 2, 3, 1, 2, 4])
    # after "1": "2" twice; after "1 2": "3" once, "4" once; after "1 2 3": "1"
    tokens, parents, scores, m = tree.draft([7, 1], budget=10)
    assert m == 1
    assert tokens[0] == 2 and parents[0] == -1 and scores[0] == 1.0
    assert sorted(tokens[1:3].tolist()) == [3, 4] and parents[1:3].tolist() == [0, 0]
    np.testing.assert_allclose(scores, [1.0, 0.5, 0.5, 0.5])
    assert tokens[3] == 1 and tokens[parents[3]] == 3


def test_wide_fan_out():
    # "0" is followed by 40 distinct tokens, 7 of them twice: more candidates than the
    # draft's initial heap holds; the root gets 50k children, freed again on remove
    seq = [x for t in list(range(1, 41)) + list(range(1, 8)) for x in (0, t)]
    tree = SuffixTree(max_depth=3)
    tree.add_sequence(seq)
    tokens, parents, scores, m = tree.draft([0], budget=3, max_match=1)
    assert m == 1 and len(set(tokens.tolist()) & set(range(1, 8))) == 3  # ties: any 3 of 1..7
    np.testing.assert_allclose(scores, [2 / 47] * 3, rtol=1e-6)
    wide = tree.add_sequence(np.arange(100, 50_100))
    assert tree.count([49_999]) == 1 and tree.count([50_099]) == 1
    tree.remove(wide)
    assert_counts(tree, [seq])


def test_memory_is_reused_not_grown():
    rng = np.random.default_rng(0)
    tree = SuffixTree(max_depth=8, max_tokens=500)
    for _ in range(300):
        tree.add_sequence(rng.integers(0, 50, rng.integers(1, 80)))
    s = tree.state()
    assert len(tree) <= 500
    assert s["nodes"].shape[0] <= 500 * 8 + 1
    assert s["table"].shape[0] <= 4 * (500 * 8 + 8 + 1)
    assert s["entries"].shape[0] <= 501
    assert s["seqs"].shape[0] <= 512


def test_single_sequence_over_budget_is_a_sliding_window():
    tree = SuffixTree(max_depth=3, max_tokens=5)
    sid = tree.add_sequence(list(range(8)))
    tree.append(sid, [8, 9])
    assert tree.live_sequences() == {sid: 5}
    assert_counts(tree, [[5, 6, 7, 8, 9]])


def test_edge_cases_never_crash():
    tree = SuffixTree()
    assert tree.match([]) == (0, 0)
    assert [len(a) for a in tree.draft([], 8)[:3]] == [0, 0, 0]
    sid = tree.add_sequence([3, 4, 5])
    assert tree.draft([], 8)[3] == 0
    assert len(tree.draft([99999], 8)[0]) == 0
    assert len(tree.draft([3, 4], 0)[0]) == 0
    assert tree.match(list(range(200)) + [3, 4, 5])[1] == 3
    assert tree.count([1 << 30]) == 0 and tree.count(list(range(100))) == 0
    tree.append(sid, [])
    tree.append(sid, np.array([6], np.uint8))
    assert len(tree) == 4
    assert SuffixTree(max_depth=1).add_sequence([]) == 0


@pytest.mark.parametrize(
    "bad", [[1, -2], [1.0, 2.0], [[1, 2]], np.array([1, 2], np.float32), [True], [1 << 40]]
)
def test_bad_tokens_raise_value_error(bad):
    tree = SuffixTree()
    sid = tree.add_sequence()
    with pytest.raises(ValueError):
        tree.append(sid, bad)
    with pytest.raises(ValueError):
        tree.draft(bad, 4)
    with pytest.raises(ValueError):
        tree.match(bad)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="max_depth"):
        SuffixTree(max_depth=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SuffixTree(max_tokens=0)
    tree = SuffixTree()
    with pytest.raises(ValueError, match="budget"):
        tree.draft([1], -1)
    with pytest.raises(ValueError, match="min_prob"):
        tree.draft([1], 4, min_prob=1.5)
    with pytest.raises(KeyError):
        tree.append(5, [1])
    sid = tree.add_sequence([1])
    tree.remove(sid)
    with pytest.raises(KeyError):
        tree.remove(sid)
    with pytest.raises(ValueError, match="missing"):
        SuffixTree.from_state({"meta": np.zeros(8, np.int64)})
    state = dict(tree.state(), nodes=np.zeros((3, 5), np.int32))
    with pytest.raises(ValueError, match="nodes"):
        SuffixTree.from_state(state)
