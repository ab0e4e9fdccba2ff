import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from retrodraft.retrieval.tree import DraftTree, exclusive, fuse, prune


def chain(tokens, scores, source=1):
    n = len(tokens)
    return DraftTree.build(tokens, np.arange(n) - 1, scores, np.full(n, source), np.arange(n) + 100 * source)


def test_empty_tree_has_no_nodes():
    t = DraftTree.empty()
    assert len(t) == 0
    t.validate()


def test_parent_after_child_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="parent must come before its child"):
        DraftTree.build([5, 6], [1, -1])


def test_self_parent_and_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="parent must come before"):
        DraftTree.build([5], [0])
    with pytest.raises(ValueError, match="length 2"):
        DraftTree.build([5, 6], [-1])


def test_child_scoring_above_parent_is_rejected():
    with pytest.raises(ValueError, match="likelier than its prefix"):
        DraftTree.build([5, 6], [-1, 0], [0.5, 0.9])


def test_negative_tokens_and_arrays_of_the_wrong_kind_are_rejected():
    with pytest.raises(ValueError, match="non-negative token ids"):
        DraftTree.build([5, -6], [-1, 0])
    good = DraftTree.build([5, 6], [-1, 0])
    for field, bad in (("tokens", np.array(["a", "b"])), ("parents", np.array([-1.0, 0.0])),
                       ("scores", np.array([1, 1]))):  # a drafter building DraftTree(...) itself
        with pytest.raises(ValueError, match=f"DraftTree.{field} must hold"):
            DraftTree(**{**good.__dict__, field: bad}).validate()


def test_depths_and_path():
    t = DraftTree.build([1, 2, 3, 4], [-1, 0, -1, 1])
    assert t.depths().tolist() == [1, 2, 1, 3]
    assert t.path(3).tolist() == [0, 1, 3]


def test_prune_keeps_highest_scores_and_stays_a_tree():
    t = DraftTree.build([1, 2, 3, 4, 5], [-1, 0, -1, 1, 2], [0.9, 0.8, 0.7, 0.2, 0.6])
    p = prune(t, 3)
    assert p.tokens.tolist() == [1, 2, 3]
    assert p.parents.tolist() == [-1, 0, -1]
    p = prune(t, 4)
    assert p.tokens.tolist() == [1, 2, 3, 5] and p.parents.tolist() == [-1, 0, -1, 2]


def test_prune_ties_keep_the_parent():
    t = DraftTree.build([1, 2, 3], [-1, 0, 1], [0.5, 0.5, 0.5])
    assert prune(t, 2).tokens.tolist() == [1, 2]


def test_prune_min_score_and_zero_budget():
    t = DraftTree.build([1, 2], [-1, 0], [0.9, 0.1])
    assert prune(t, 5, min_score=0.5).tokens.tolist() == [1]
    assert len(prune(t, 0)) == 0
    with pytest.raises(ValueError):
        prune(t, -1)


def test_fuse_merges_common_prefixes_and_unions_sources():
    a = chain([7, 8, 9], [0.9, 0.5, 0.4], source=1)
    b = chain([7, 8, 4], [0.6, 0.6, 0.3], source=2)
    f = fuse([a, b])
    assert f.tokens.tolist() == [7, 8, 9, 4]
    assert f.parents.tolist() == [-1, 0, 1, 1]
    np.testing.assert_allclose(f.scores, [0.9, 0.6, 0.4, 0.3])
    assert f.sources.tolist() == [3, 3, 1, 2]
    # the shared node keeps the origin of its best-scoring proposer
    assert f.origins.tolist() == [100, 201, 102, 202]
    f.validate()


def test_fuse_of_nothing_is_empty():
    assert len(fuse([])) == 0
    assert len(fuse([DraftTree.empty(), DraftTree.empty()])) == 0


@st.composite
def random_tree(draw):
    n = draw(st.integers(0, 12))
    parents, scores, tokens, seen = [], [], [], set()
    for i in range(n):
        p = draw(st.integers(-1, i - 1))
        cap = 1.0 if p < 0 else scores[p]
        scores.append(draw(st.floats(0, 1)) * cap)
        parents.append(p)
        t = draw(st.integers(0, 3))
        t = t if (p, t) not in seen else 100 + i  # drafters emit tries: siblings differ
        seen.add((p, t))
        tokens.append(t)
    return DraftTree.build(tokens, parents, scores)


def paths(t: DraftTree) -> set[tuple[int, ...]]:
    return {tuple(t.tokens[t.path(i)].tolist()) for i in range(len(t))}


@settings(max_examples=150, deadline=None)
@given(st.lists(random_tree(), max_size=3), st.integers(0, 20))
def test_fuse_keeps_every_path_and_prunes_to_the_best(trees, budget):
    full = fuse(trees)
    full.validate()
    assert paths(full) == set().union(*[paths(t) for t in trees]) if trees else len(full) == 0
    # a fused node's tokens path is unique
    assert len(paths(full)) == len(full)
    pruned = fuse(trees, budget)
    pruned.validate()
    assert len(pruned) == min(budget, len(full))
    if 0 < len(pruned) < len(full):
        assert pruned.scores.min() >= np.sort(full.scores)[::-1][len(pruned)] - 1e-7


def test_exclusive_scales_siblings_that_claim_more_than_their_parent_with_their_subtrees():
    # under the root: 0.8 + 0.4 > 1; node 2 (child of 0) keeps its share of node 0
    tree = DraftTree.build([1, 2, 3], [-1, -1, 0], [0.8, 0.4, 0.6])
    np.testing.assert_allclose(exclusive(tree).scores, [0.8 / 1.2, 0.4 / 1.2, 0.6 / 1.2], rtol=1e-6)
    consistent = DraftTree.build([1, 2, 3], [-1, -1, 0], [0.5, 0.3, 0.2])
    np.testing.assert_array_equal(exclusive(consistent).scores, consistent.scores)


@settings(max_examples=200, deadline=None)
@given(st.lists(random_tree(), min_size=1, max_size=3))
def test_exclusive_scores_are_path_probabilities(trees):
    fused = fuse(trees)
    out = exclusive(fused)
    out.validate()
    assert np.all(out.scores <= fused.scores + 1e-6)
    for p in [-1, *range(len(out))]:
        cap = 1.0 if p < 0 else out.scores[p]
        assert out.scores[out.parents == p].sum() <= cap + 1e-5
