import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from retrodraft.index.lookup import suffix_occurrences
from retrodraft.index.trie import build_trie
from retrodraft.retrieval.drafters import PromptLookupDrafter, ReferenceDrafter


def oracle(stream, end, context, min_n, max_n):
    """Brute force: (continuation starts of the longest suffix, most recent first, n)."""
    for n in range(min(max_n, len(context)), min_n - 1, -1):
        pat = list(context[-n:])
        hits = [c for c in range(min(end, len(stream)) - 1, 0, -1)
                if c - n >= 0 and list(stream[c - n:c]) == pat and min(stream[c - n:c]) >= 0]
        if hits:
            return hits, n
    return [], 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-1, 3), max_size=40), st.lists(st.integers(0, 3), max_size=8),
       st.integers(1, 3), st.integers(0, 3), st.integers(1, 6))
def test_occurrences_match_brute_force(stream, context, min_n, extra, cap):
    stream = np.array(stream, np.int32)
    context = np.array(context, np.int32)
    out = np.empty(cap, np.int64)
    count, n = suffix_occurrences(stream, len(stream), context, min_n, min_n + extra, out)
    hits, n_ref = oracle(stream, len(stream), context, min_n, min_n + extra)
    assert n == n_ref
    assert out[:count].tolist() == hits[:cap]


def test_context_never_matches_its_own_tail():
    ctx = np.array([7, 8, 9], np.int32)
    out = np.empty(4, np.int64)
    assert suffix_occurrences(ctx, len(ctx), ctx, 1, 3, out) == (0, 0)


def test_trie_counts_shared_prefixes():
    stream = np.array([1, 2, 3, -1, 1, 2, 4, 1, 5], np.int32)
    cap = 16
    tok, par, cnt, org = (np.empty(cap, np.int32), np.empty(cap, np.int32), np.empty(cap, np.int32), np.empty(cap, np.int64))
    n = build_trie(stream, np.array([1, 5, 8], np.int64), 3, tok, par, cnt, org)
    # continuations: [2, 3] (stops at the separator), [2, 4, 1], [5]
    assert tok[:n].tolist() == [2, 3, 4, 1, 5]
    assert par[:n].tolist() == [-1, 0, 0, 2, -1]
    assert cnt[:n].tolist() == [2, 1, 1, 1, 1]
    assert org[:n].tolist() == [1, 2, 6, 7, 8]


def test_drafter_branches_over_several_occurrences():
    # "1 2" is followed by 3 twice and by 4 once
    ctx = np.array([1, 2, 3, 9, 1, 2, 4, 9, 1, 2, 3, 8, 1, 2], np.int32)
    tree = PromptLookupDrafter(max_n=2).propose(ctx, budget=8)
    tree.validate()
    first = {int(t): float(s) for t, s, p in zip(tree.tokens, tree.scores, tree.parents) if p == -1}
    assert set(first) == {3, 4}
    assert first[3] > first[4]


def test_drafter_searches_references_and_reports_origins():
    ref_a, ref_b = [5, 5, 5], [6, 1, 2, 3, 4]
    d = ReferenceDrafter([ref_a, ref_b], names=["a.txt", "b.txt"])
    tree = d.propose(np.array([0, 1, 2], np.int32), budget=4)
    assert tree.tokens.tolist()[:2] == [3, 4]
    assert d.locate(int(tree.origins[0])) == ("b.txt", 3)


def test_drafter_budget_zero_and_no_match_give_empty_trees():
    d = PromptLookupDrafter()
    assert len(d.propose(np.array([1, 2, 1], np.int32), budget=0)) == 0
    assert len(d.propose(np.array([1, 2, 3], np.int32), budget=8)) == 0
    assert len(d.propose(np.array([], np.int32), budget=8)) == 0


def test_bad_drafter_settings_are_rejected():
    with pytest.raises(ValueError, match="min_n <= max_n"):
        PromptLookupDrafter(min_n=3, max_n=2)
    with pytest.raises(ValueError, match="1-D sequence of token ids"):
        ReferenceDrafter([[[1, 2]]])
