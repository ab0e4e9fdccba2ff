"""index.tree_paths against the rules written out node by node, on random trees."""

import numpy as np
import pytest

from retrodraft.index import tree_paths


def random_tree(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens, parents (topological, some under the root) and path scores."""
    parents = np.array([rng.integers(-1, i) if i else -1 for i in range(n)], np.int32)
    tokens = rng.integers(0, 4, n).astype(np.int32)  # few tokens: paths often match
    scores = rng.uniform(0, 1, n)
    return tokens, parents, scores


def depth_of(parents: np.ndarray, i: int) -> int:
    d = 0
    while i >= 0:
        d, i = d + 1, parents[i]
    return d


@pytest.mark.parametrize("seed", range(20))
def test_depths_and_path_minimum_follow_the_paths(seed):
    rng = np.random.default_rng(seed)
    tokens, parents, scores = random_tree(rng, int(rng.integers(0, 40)))
    assert tree_paths.depths(parents).tolist() == [depth_of(parents, i) for i in range(len(parents))]
    s = scores.astype(np.float32)
    tree_paths.path_minimum(s, parents)
    for i in range(len(parents)):
        on_path, j = [], i
        while j >= 0:
            on_path.append(scores.astype(np.float32)[j])
            j = parents[j]
        assert s[i] == min(on_path)


@pytest.mark.parametrize("seed", range(20))
def test_exclusive_scores_keep_siblings_within_their_parent(seed):
    rng = np.random.default_rng(seed)
    _, parents, scores = random_tree(rng, int(rng.integers(1, 40)))
    tree_paths.path_minimum(scores, parents)
    out = tree_paths.exclusive_scores(scores, parents)
    # siblings sum to at most their parent's final score (1 under the root) ...
    for p in range(-1, len(parents)):
        kids = np.flatnonzero(parents == p)
        if len(kids):
            assert out[kids].sum() <= (1.0 if p < 0 else out[p]) + 1e-9
    # ... and each set of siblings is scaled by one factor times its parent's, at most 1
    for i in range(len(parents)):
        ratio = out[i] / scores[i]
        p = parents[i]
        parent_ratio = 1.0 if p < 0 else out[p] / scores[p]
        assert ratio <= parent_ratio + 1e-9
        kids = np.flatnonzero(parents == p)
        assert np.allclose(out[kids] / scores[kids], ratio)
    # where nothing needs scaling, nothing is scaled
    chain = np.arange(5, dtype=np.int32) - 1
    flat = np.array([0.9, 0.8, 0.5, 0.4, 0.1])
    assert np.array_equal(tree_paths.exclusive_scores(flat, chain), flat)


@pytest.mark.parametrize("seed", range(20))
def test_outcomes_decide_what_the_emitted_tokens_decide(seed):
    rng = np.random.default_rng(seed)
    tokens, parents, _ = random_tree(rng, int(rng.integers(0, 40)))
    emitted = rng.integers(0, 4, int(rng.integers(1, 6))).astype(np.int32)
    known, right = tree_paths.outcomes(tokens, parents, emitted)
    for i in range(len(parents)):
        path, j = [], i
        while j >= 0:
            path.append(tokens[j])
            j = parents[j]
        path = path[::-1]
        matched = 0
        while matched < min(len(path), len(emitted)) and path[matched] == emitted[matched]:
            matched += 1
        if matched == len(path):  # the whole path matches: decided right
            assert known[i] and right[i]
        elif matched == len(emitted):  # matches all that was emitted and goes on
            assert not known[i]
        else:  # went wrong within what was emitted
            assert known[i] and not right[i]
