from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrodraft.index.ngram import NgramTable


def oracle(stream, max_n):
    """{n-gram tuple: Counter of next tokens}, by brute force."""
    table = defaultdict(Counter)
    for p, t in enumerate(stream):
        if t < 0:
            continue
        for n in range(1, max_n + 1):
            gram = stream[p - n : p] if p >= n else None
            if gram is None or min(gram) < 0:
                break
            table[tuple(gram)][t] += 1
    return table


def rows(table):
    """{n-gram tuple: row} read back from the state arrays."""
    slots = table.state()["slots"]
    out = {}
    for slot in slots[slots[:, -1] >= 0].tolist():
        gram = tuple(t for t in slot[:-1] if t >= 0)
        assert gram not in out, f"n-gram {gram} stored twice"
        out[gram] = slot[-1]
    assert sorted(out.values()) == list(range(len(table)))
    return out


def check(table, stream):
    expected = oracle(stream, table.max_n)
    where = rows(table)
    assert set(where) == set(expected)
    s = table.state()
    k = table.top_k
    for gram, true in expected.items():
        i = where[gram]
        toks, cnts, errs = s["tokens"][i], s["counts"][i], s["errors"][i]
        kept = toks >= 0
        toks, cnts, errs = toks[kept], cnts[kept], errs[kept]
        total = sum(true.values())
        assert cnts.sum() == total
        order = sorted(zip((-cnts).tolist(), toks.tolist()))
        assert order == list(zip((-cnts).tolist(), toks.tolist())), "row not sorted"
        n, lt, lc = table.lookup(np.array(gram))
        assert n == len(gram) and lt.tolist() == toks.tolist() and lc.tolist() == cnts.tolist()
        if len(true) <= k:
            assert dict(zip(toks.tolist(), cnts.tolist())) == dict(true)
            assert not errs.any()
        else:
            # Space-Saving: counts - errors <= true <= counts, errors <= T/k, heavy hitters kept
            for t, c, e in zip(toks.tolist(), cnts.tolist(), errs.tolist()):
                assert c - e <= true[t] <= c and e * k <= total
            for t, c in true.items():
                if c * k > total:
                    assert t in toks.tolist()


def test_hand_checked_lookup():
    t = NgramTable.build([1, 2, 3, 1, 2, 4, -1, 1, 2, 3], max_n=2)
    n, toks, cnts = t.lookup([7, 1, 2])
    assert n == 2 and toks.tolist() == [3, 4] and cnts.tolist() == [2, 1]
    # [9, 2] was never seen: falls back to the unigram 2, same continuations
    n, toks, cnts = t.lookup([9, 2])
    assert n == 1 and toks.tolist() == [3, 4] and cnts.tolist() == [2, 1]
    # 4 was only followed by the separator, and the suffix stops at a separator
    assert t.lookup([4])[0] == 0
    assert t.lookup([2, -1])[0] == 0
    assert t.lookup([3])[1].tolist() == [1]  # 3 -> 1 at position 3; 3 at the end has no next
    assert t.lookup([])[0] == 0
    assert t.lookup(np.array([1, 2], np.int64))[0] == 2


def test_ties_go_to_lower_token():
    t = NgramTable.build([5, 9, 5, 7, 5, 8], max_n=1)
    assert t.lookup([5])[1].tolist() == [7, 8, 9]


streams = st.lists(st.integers(-1, 5), max_size=120)


@settings(max_examples=150, deadline=None)
@given(streams, st.integers(1, 4), st.integers(1, 4), st.lists(st.integers(0, 120), max_size=4))
def test_matches_brute_force_with_updates(stream, max_n, top_k, cuts):
    table = NgramTable(max_n=max_n, top_k=top_k, capacity=1)  # forces several rehashes
    bounds = [0, *sorted(cuts), len(stream)]
    for lo, hi in zip(bounds, bounds[1:]):
        table.update(np.array(stream[lo:hi], np.int32))
    check(table, stream)
    assert table.state()["slots"].shape[0] >= 2 * len(table)


@settings(max_examples=100, deadline=None)
@given(streams, st.lists(st.integers(-1, 5), max_size=8))
def test_lookup_is_longest_suffix(stream, context):
    table = NgramTable.build(stream, max_n=3)
    expected = oracle(stream, 3)
    n, toks, cnts = table.lookup(context)
    want = 0
    for m in range(min(3, len(context)), 0, -1):
        if tuple(context[-m:]) in expected:
            want = m
            break
    assert n == want
    if want:
        true = expected[tuple(context[-want:])]
        if len(true) <= table.top_k:
            want_rows = sorted(true.items(), key=lambda x: (-x[1], x[0]))
            assert list(zip(toks.tolist(), cnts.tolist())) == want_rows
    else:
        assert toks.size == 0 and cnts.size == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=50, max_size=400), st.integers(1, 3))
def test_space_saving_guarantee_many_continuations(stream, top_k):
    table = NgramTable.build(stream, max_n=2, top_k=top_k)
    check(table, stream)


def test_state_roundtrip_read_only():
    rng = np.random.default_rng(0)
    stream = rng.integers(-1, 20, 500).astype(np.int32)
    table = NgramTable.build(stream)
    arrays = {k: v.copy() for k, v in table.state().items()}
    for v in arrays.values():
        v.flags.writeable = False
    back = NgramTable.from_state(arrays)
    for _ in range(50):
        ctx = rng.integers(-1, 20, 5)
        a, b = table.lookup(ctx), back.lookup(ctx)
        assert a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    more = rng.integers(-1, 20, 300).astype(np.int32)
    back.update(more)
    check(back, np.concatenate([stream, more]).tolist())
    assert not arrays["slots"].flags.writeable and np.array_equal(
        arrays["counts"], table.state()["counts"]
    )


def test_from_state_never_writes_its_arrays():
    table = NgramTable.build([1, 2, 3, 1, 2])
    before = {k: v.copy() for k, v in table.state().items()}
    back = NgramTable.from_state(table.state())
    back.update([3, 1, 2, 4] * 50)
    assert all(np.array_equal(v, before[k]) for k, v in table.state().items())
    assert table.lookup([1, 2])[1].tolist() == [3] and back.lookup([1, 2])[2].tolist() == [50, 2]


def test_updates_continue_the_stream():
    table = NgramTable(max_n=2)
    table.update([1, 2])
    table.update([3])
    assert table.lookup([1, 2])[1].tolist() == [3]
    table.update([-1, 4])
    assert table.lookup([3])[0] == 0


def test_empty_and_invalid_inputs():
    table = NgramTable.build(np.array([], np.int32))
    assert len(table) == 0 and table.lookup([1, 2, 3, 4, 5, 6])[0] == 0
    table.update([])
    with pytest.raises(ValueError, match="1-D integer"):
        table.update(np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="1-D integer"):
        table.lookup([1.5])
    with pytest.raises(ValueError, match="int32"):
        table.update(np.array([2**40]))
    with pytest.raises(ValueError, match="max_n"):
        NgramTable(max_n=0)
    with pytest.raises(ValueError, match="top_k"):
        NgramTable(top_k=0)
    state = table.state()
    with pytest.raises(ValueError, match="must have arrays"):
        NgramTable.from_state({k: v for k, v in state.items() if k != "tail"})
    with pytest.raises(ValueError, match="int32"):
        NgramTable.from_state({**state, "slots": state["slots"].astype(np.int64)})
    with pytest.raises(ValueError, match="int32 counts"):
        NgramTable.from_state({**state, "seen": np.array([2**31 - 3])}).update([1, 2, 3])
    with pytest.raises(ValueError, match="inconsistent"):
        NgramTable.from_state({**state, "slots": state["slots"][:-1]})
    with pytest.raises(ValueError, match="inconsistent"):
        NgramTable.from_state({**state, "tail": state["tail"][:-1]})


def test_bounded_table_keeps_frequent_ngrams_in_fixed_memory():
    rng = np.random.default_rng(1)
    table = NgramTable(max_n=2, top_k=4, capacity=16, max_ngrams=64)
    frequent = np.array([40, 41, 42, 43], np.int32)
    for _ in range(300):  # a repeated phrase among a stream of one-off n-grams
        table.update(np.concatenate([[-1], frequent, rng.integers(100, 10_000, 6)]).astype(np.int32))
        assert len(table) <= 64 and table.nbytes <= NgramTable.bytes_for(64, 2, 4)
    n, toks, cnts = table.lookup([41, 42])
    assert n == 2 and toks.tolist() == [43] and cnts[0] > 100
    assert table.state()["slots"].shape[0] >= 2 * len(table)
    for gram in rows(table):  # every stored n-gram is still found after the evictions
        assert table.lookup(np.array(gram))[0] == len(gram)


def test_bytes_for_and_ngrams_for_agree():
    for nbytes in (10_000, 1 << 20, 12_345_678):
        m = NgramTable.ngrams_for(nbytes)
        assert NgramTable.bytes_for(m) <= nbytes < NgramTable.bytes_for(m + 1)
    with pytest.raises(ValueError, match="cannot hold"):
        NgramTable.ngrams_for(100)
    with pytest.raises(ValueError, match="max_ngrams"):
        NgramTable(max_n=4, max_ngrams=8)
