"""Walks over a draft tree's flat arrays: depths, path scores, outcomes.

A draft tree's nodes come in topological order (``parents[i] < i``, -1 under the root), so
every rule that flows down the tree is one pass in index order. Each step of speculation
runs several such passes over up to a few hundred candidate nodes (per drafter, then over
the fused tree); as Python loops they were a good part of the step's host time.
"""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def depths(parents: np.ndarray) -> np.ndarray:
    """int32 [n]: 1 for children of the root, the parent's depth + 1 below."""
    n = parents.shape[0]
    out = np.ones(n, np.int32)
    for i in range(n):
        p = parents[i]
        if p >= 0:
            out[i] = out[p] + 1
    return out


@numba.njit(cache=True, nogil=True)
def first_fault(tokens: np.ndarray, parents: np.ndarray, scores: np.ndarray) -> tuple[int, int]:
    """(rule, node): the first node breaking a draft tree's rules, checked rule by rule: 1, a
    parent not before its child (nor -1); 2, a negative token; 3, a score above its parent's
    (beyond 1e-6). (0, -1) when none does."""
    n = parents.shape[0]
    for i in range(n):
        if parents[i] < -1 or parents[i] >= i:
            return 1, i
    for i in range(n):
        if tokens[i] < 0:
            return 2, i
    for i in range(n):
        p = parents[i]
        if p >= 0 and scores[i] > scores[p] + 1e-6:
            return 3, i
    return 0, -1


@numba.njit(cache=True, nogil=True)
def path_minimum(scores: np.ndarray, parents: np.ndarray) -> None:
    """In place: each score becomes the minimum along its path from the root (a path is no
    likelier than its prefix)."""
    for i in range(parents.shape[0]):
        p = parents[i]
        if p >= 0 and scores[i] > scores[p]:
            scores[i] = scores[p]


@numba.njit(cache=True, nogil=True)
def exclusive_scores(scores: np.ndarray, parents: np.ndarray) -> np.ndarray:
    """float64 [n]: ``scores`` with every set of siblings scaled down together (and their
    subtrees with them) where they sum to more than their parent's scaled score (1 under
    the root): siblings are different tokens, so at most one of them is right."""
    n = parents.shape[0]
    children = np.zeros(n + 1, np.float64)  # sum of each node's children's scores; the root's at n
    for i in range(n):
        p = parents[i]
        children[p if p >= 0 else n] += scores[i]
    factor = np.ones(n + 1, np.float64)  # cumulative scale of each node's subtree; the root's at n
    scale = np.ones(n + 1, np.float64)  # the scale of each node's children, set at its first child
    done = np.zeros(n + 1, np.bool_)
    out = np.empty(n, np.float64)
    for i in range(n):
        p = parents[i]
        q = p if p >= 0 else n
        if not done[q]:
            total = children[q] * factor[q]
            cap = 1.0 if p < 0 else out[p]
            scale[q] = min(1.0, cap / total) if total > 0 else 1.0
            done[q] = True
        out[i] = scores[i] * factor[q] * scale[q]
        factor[i] = factor[q] * scale[q]
    return out


@numba.njit(cache=True, nogil=True)
def outcomes(tokens: np.ndarray, parents: np.ndarray, emitted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(known, right), bool [n] each: whether ``emitted`` (the tokens a step produced, the
    target's own choices) decides a node, and if so whether the node's whole path spells
    the emitted tokens from the first. A path that matches every emitted token and goes on
    is undecided; one that went wrong earlier is decided wrong."""
    n = parents.shape[0]
    depth = depths(parents)
    known = np.zeros(n, np.bool_)
    right = np.zeros(n, np.bool_)
    for i in range(n):
        p = parents[i]
        parent_right = True if p < 0 else right[p]
        parent_known = True if p < 0 else known[p]
        if not parent_known or (parent_right and depth[i] > emitted.shape[0]):
            continue
        known[i] = True
        right[i] = parent_right and tokens[i] == emitted[depth[i] - 1]
    return known, right


@numba.njit(cache=True, nogil=True)
def merge(tokens, parents, scores, sources, origins, starts):
    """Trees merged by common prefix. Input: the trees' arrays concatenated, tree t at
    ``starts[t]:starts[t + 1]`` with parents indexing within its own tree. A node whose path
    of tokens is already in the merged tree joins that node: the higher score, the union of
    source bits, and the origin of the better scoring proposer that has one. Returns the
    merged node count m and the merged arrays (valid up to m), nodes in first-seen order."""
    total = tokens.shape[0]
    out_tokens = np.empty(total, np.int32)
    out_parents = np.empty(total, np.int32)
    out_scores = np.empty(total, np.float32)
    out_sources = np.empty(total, np.uint8)
    out_origins = np.empty(total, np.int64)
    first_child = np.full(total + 1, -1, np.int64)  # per merged node, the root's at total
    next_sibling = np.full(total, -1, np.int64)
    remap = np.empty(total, np.int64)
    m = 0
    for t in range(starts.shape[0] - 1):
        base = starts[t]
        for i in range(base, starts[t + 1]):
            fp = -1 if parents[i] < 0 else remap[base + parents[i]]
            slot = total if fp < 0 else fp
            j = first_child[slot]
            while j >= 0 and out_tokens[j] != tokens[i]:
                j = next_sibling[j]
            if j < 0:
                j = m
                m += 1
                out_tokens[j], out_parents[j], out_scores[j] = tokens[i], fp, scores[i]
                out_sources[j], out_origins[j] = sources[i], origins[i]
                next_sibling[j] = first_child[slot]
                first_child[slot] = j
            else:
                out_sources[j] |= sources[i]
                if origins[i] >= 0 and (out_origins[j] < 0 or scores[i] > out_scores[j]):
                    out_origins[j] = origins[i]
                out_scores[j] = max(out_scores[j], scores[i])
            remap[i] = j
    return m, out_tokens, out_parents, out_scores, out_sources, out_origins
