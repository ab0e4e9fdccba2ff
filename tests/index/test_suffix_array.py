"""index/suffix_array.py against plain-Python oracles, and index/trie.top_nodes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrodraft.index import suffix_array
from retrodraft.index.trie import top_nodes

I32 = np.int32


def _key(stream: np.ndarray, i: int) -> list[tuple[int, int]]:
    """Suffix i as sortable symbols: separator j -> (0, j), token t -> (1, t); shorter is less."""
    sep = np.cumsum(stream < 0) - 1
    return [(0, int(sep[j])) if t < 0 else (1, int(t)) for j, t in enumerate(stream[i:], i)]


def oracle_sa(stream: np.ndarray) -> np.ndarray:
    return np.array(sorted(range(len(stream)), key=lambda i: _key(stream, i)), np.int64)


def oracle_match(stream, sa, context, max_len):
    s, c = stream.tolist(), context.tolist()
    for L in range(min(max_len, len(c)), 0, -1):
        pat = c[len(c) - L :]
        occ = {i for i in range(len(s) - L + 1) if s[i : i + L] == pat and min(pat) >= 0}
        if occ:
            ranks = [r for r in range(len(sa)) if sa[r] in occ]
            assert ranks == list(range(ranks[0], ranks[0] + len(occ)))
            return ranks[0], ranks[-1] + 1, L
    return 0, 0, 0


def oracle_continuations(stream, sa, lo, hi, length, max_positions, depth, budget):
    """Paths (token tuples) with count, creation id and origin, top budget by (count desc, id)."""
    m = min(max_positions, hi - lo)
    nodes = {}
    for i in range(m):
        s = int(sa[lo + i * (hi - lo) // m]) + length
        for d in range(depth):
            if s + d >= len(stream) or stream[s + d] < 0:
                break
            path = tuple(stream[s : s + d + 1].tolist())
            count, id_, origin = nodes.get(path, (0, len(nodes), s + d))
            nodes[path] = (count + 1, id_, origin)
    top = sorted(nodes.items(), key=lambda kv: (-kv[1][0], kv[1][1]))[:budget]
    return {path: (count / m, origin) for path, (count, _, origin) in top}


def check_tree(tokens, parents, scores, origins, budget):
    assert tokens.dtype == I32 and parents.dtype == I32
    assert scores.dtype == np.float32 and origins.dtype == np.int64
    k = tokens.shape[0]
    assert k <= budget and parents.shape == scores.shape == origins.shape == (k,)
    for i in range(k):
        assert -1 <= parents[i] < i
        if parents[i] >= 0:
            assert scores[i] <= scores[parents[i]]


def paths_of(tokens, parents):
    paths = []
    for i in range(tokens.shape[0]):
        p = int(parents[i])
        paths.append((paths[p] if p >= 0 else ()) + (int(tokens[i]),))
    return paths


# Small vocab so repeats happen; -1 and -3 are separators.
symbols = st.sampled_from([-3, -1, 0, 1, 1, 2, 2, 2, 3])
streams = st.lists(symbols, max_size=40).map(lambda xs: np.array(xs, I32))


@settings(max_examples=200, deadline=None)
@given(streams, st.sampled_from([0, 5, 2**31 - 8]))
def test_build_equals_sorted_suffixes(stream, offset):
    # A large offset pushes ids past the dense rank table onto the sorted-ranks path.
    stream = np.where(stream >= 0, stream + offset, stream).astype(I32)
    sa = suffix_array.build(stream)
    assert sa.dtype == np.int64
    np.testing.assert_array_equal(sa, oracle_sa(stream))


@pytest.mark.parametrize(
    "stream",
    [
        [3] * 300,
        [1, 2] * 200,
        [2, 1, 1] * 150 + [-1] + [2, 1, 1] * 150,
        [-1] * 50,
        list(range(100, 0, -1)),
        list(range(100)),
    ],
    ids=["constant", "period-2", "period-3-with-separator", "only-separators", "falling", "rising"],
)
def test_build_repetitive_streams(stream):
    stream = np.array(stream, I32)
    np.testing.assert_array_equal(suffix_array.build(stream), oracle_sa(stream))


def test_build_larger_stream_recurses_deeply():
    rng = np.random.default_rng(7)
    stream = rng.integers(-1, 3, 3000).astype(I32)
    stream[1000:2000] = np.tile(stream[:10], 100)
    np.testing.assert_array_equal(suffix_array.build(stream), oracle_sa(stream))


@st.composite
def match_cases(draw):
    stream = draw(streams)
    context = draw(st.lists(symbols, max_size=6))
    if len(stream) and draw(st.booleans()):
        a = draw(st.integers(0, len(stream) - 1))
        context = context + stream[a : draw(st.integers(a, len(stream)))].tolist()
    return stream, np.array(context, I32), draw(st.integers(0, 12))


@settings(max_examples=200, deadline=None)
@given(match_cases())
def test_longest_match_equals_oracle(case):
    stream, context, max_len = case
    sa = suffix_array.build(stream)
    assert suffix_array.longest_match(stream, sa, context, max_len) == oracle_match(
        stream, sa, context, max_len
    )


@settings(max_examples=200, deadline=None)
@given(
    match_cases(),
    st.integers(0, 5),
    st.integers(0, 5),
    st.integers(0, 20),
)
def test_continuations_equal_brute_force_counts(case, max_positions, depth, budget):
    stream, context, max_len = case
    sa = suffix_array.build(stream)
    lo, hi, length = suffix_array.longest_match(stream, sa, context, max_len)
    got = suffix_array.continuations(stream, sa, lo, hi, length, max_positions, depth, budget)
    check_tree(*got, budget)
    tokens, parents, scores, origins = got
    want = oracle_continuations(stream, sa, lo, hi, length, max_positions, depth, budget)
    assert dict(zip(paths_of(tokens, parents), zip(scores.tolist(), origins.tolist()))) == {
        p: (pytest.approx(s), o) for p, (s, o) in want.items()
    }


def test_hand_checked_example():
    #                   0  1  2  3  4   5  6  7  8
    stream = np.array([5, 7, 5, 7, 9, -1, 5, 7, 8], I32)
    sa = suffix_array.build(stream)
    # [5, 7] occurs at 0, 2, 6; [9, 5, 7] never (a separator stands between 9 and 5).
    lo, hi, length = suffix_array.longest_match(stream, sa, np.array([9, 5, 7], I32), 8)
    assert length == 2 and sorted(sa[lo:hi]) == [0, 2, 6]
    tokens, parents, scores, origins = suffix_array.continuations(
        stream, sa, lo, hi, length, 10, 2, 10
    )
    # After [5, 7]: "5 7" (at 2), "9" then the separator (at 4), "8" then the end (at 8).
    got = {p: (s, o) for p, s, o in zip(paths_of(tokens, parents), scores, origins)}
    third = pytest.approx(1 / 3)
    assert got == {(5,): (third, 2), (5, 7): (third, 3), (9,): (third, 4), (8,): (third, 8)}


def test_continuations_spread_samples_over_the_range():
    stream = np.array(([4, 1] * 50 + [4, 2] * 50), I32)
    sa = suffix_array.build(stream)
    lo, hi, length = suffix_array.longest_match(stream, sa, np.array([4], I32), 1)
    assert hi - lo == 100
    tokens, parents, scores, _ = suffix_array.continuations(stream, sa, lo, hi, length, 10, 1, 5)
    # The first 10 occurrences in SA order are all followed by 1; an even spread sees both.
    assert dict(zip(tokens.tolist(), scores.tolist())) == {1: 0.5, 2: 0.5}


def test_empty_stream():
    stream = np.empty(0, I32)
    sa = suffix_array.build(stream)
    assert sa.dtype == np.int64 and sa.shape == (0,)
    assert suffix_array.longest_match(stream, sa, np.array([1, 2], I32), 4) == (0, 0, 0)
    out = suffix_array.continuations(stream, sa, 0, 0, 0, 4, 4, 4)
    assert [a.shape for a in out] == [(0,)] * 4


def test_context_longer_than_stream_and_unseen_tokens():
    stream = np.array([1, 2, 3], I32)
    sa = suffix_array.build(stream)
    assert suffix_array.longest_match(stream, sa, np.array([0, 0, 1, 2, 3], I32), 10)[2] == 3
    assert suffix_array.longest_match(stream, sa, np.array([1, 2, 2**31 - 1], I32), 10) == (0, 0, 0)
    assert suffix_array.longest_match(stream, sa, np.array([1, 2, -1], I32), 10) == (0, 0, 0)
    assert suffix_array.longest_match(stream, sa, np.array([], I32), 10) == (0, 0, 0)
    assert suffix_array.longest_match(stream, sa, np.array([3], I32), 0) == (0, 0, 0)


def test_budget_zero_gives_empty_arrays():
    stream = np.array([1, 2, 1, 3], I32)
    sa = suffix_array.build(stream)
    tokens, parents, scores, origins = suffix_array.continuations(stream, sa, 0, 4, 0, 4, 3, 0)
    assert [a.shape for a in (tokens, parents, scores, origins)] == [(0,)] * 4
    assert (tokens.dtype, parents.dtype, scores.dtype, origins.dtype) == (
        I32, I32, np.float32, np.int64
    )


def test_read_only_memory_mapped_inputs(tmp_path):
    rng = np.random.default_rng(3)
    stream = rng.integers(0, 4, 500).astype(I32)
    stream[50] = -1
    np.save(tmp_path / "stream.npy", stream)
    np.save(tmp_path / "sa.npy", suffix_array.build(stream))
    mapped = np.load(tmp_path / "stream.npy", mmap_mode="r")
    sa = np.load(tmp_path / "sa.npy", mmap_mode="r")
    assert not mapped.flags.writeable and not sa.flags.writeable
    np.testing.assert_array_equal(suffix_array.build(mapped), sa)
    context = stream[100:110].copy()
    context.flags.writeable = False
    lo, hi, length = suffix_array.longest_match(mapped, sa, context, 8)
    assert length == 8
    tokens, *_ = suffix_array.continuations(mapped, sa, lo, hi, length, 16, 4, 8)
    assert tokens.shape[0] >= 1
    np.testing.assert_array_equal(np.load(tmp_path / "stream.npy"), stream)


def test_non_contiguous_stream_is_accepted():
    stream = np.array([1, 9, 2, 9, 1, 9, 2, 9], I32)[::2]
    np.testing.assert_array_equal(suffix_array.build(stream), oracle_sa(stream))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.array([1, 2], np.int64), "stream must be 1-D int32, got int64 [2]"),
        (np.zeros((2, 2), I32), "stream must be 1-D int32, got int32 [2, 2]"),
        ([1, 2], "stream must be 1-D int32, got list"),
    ],
)
def test_build_rejects_bad_streams(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        suffix_array.build(bad)


def test_queries_reject_bad_arguments():
    stream = np.array([1, 2, 1], I32)
    sa = suffix_array.build(stream)
    with pytest.raises(ValueError, match="context must be 1-D int32, got int64"):
        suffix_array.longest_match(stream, sa, np.array([1], np.int64), 4)
    with pytest.raises(ValueError, match="sa must be 1-D int64, got int32"):
        suffix_array.longest_match(stream, sa.astype(I32), np.array([1], I32), 4)
    with pytest.raises(ValueError, match="sa must be the suffix array of stream"):
        suffix_array.longest_match(stream, sa[:2], np.array([1], I32), 4)
    with pytest.raises(ValueError, match="max_len must be an int >= 0, got -1"):
        suffix_array.longest_match(stream, sa, np.array([1], I32), -1)
    with pytest.raises(ValueError, match="need 0 <= lo <= hi <= len"):
        suffix_array.continuations(stream, sa, 2, 1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="need 0 <= lo <= hi <= len"):
        suffix_array.continuations(stream, sa, 0, 4, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="budget must be an int >= 0, got float"):
        suffix_array.continuations(stream, sa, 0, 1, 1, 4, 4, 2.0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=30), st.integers(0, 35))
def test_top_nodes_ranks_by_count_then_index(counts, budget):
    counts = np.array(counts, I32)
    out = np.empty(max(budget, 1), np.int64)
    k = top_nodes(counts, counts.shape[0], budget, out)
    want = sorted(sorted(range(len(counts)), key=lambda i: (-counts[i], i))[:budget])
    assert out[:k].tolist() == want
