"""Counted trie over continuations in a token stream.

Several indices find positions in a stream after which the context is likely to go on
(prompt lookup, the suffix array's occurrences). They all turn those positions into a
draft tree the same way: insert each continuation into a trie that counts how many
continuations pass through every node.
"""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def build_trie(
    stream: np.ndarray,
    starts: np.ndarray,
    depth: int,
    tokens: np.ndarray,
    parents: np.ndarray,
    counts: np.ndarray,
    origins: np.ndarray,
) -> int:
    """Insert ``stream[s : s + depth]`` for every ``s`` in ``starts`` into a counted trie.

    A continuation stops early at the end of the stream or at a negative (separator) token.
    Outputs are caller-owned arrays of equal length (the node capacity); nodes are written in
    creation order, so a parent's index is always smaller than its child's.
      tokens  int32[cap]  token of each node
      parents int32[cap]  parent node, -1 for children of the root
      counts  int32[cap]  continuations passing through the node
      origins int64[cap]  stream position of the token that created the node
    Returns the number of nodes written. Once capacity is reached, new nodes are dropped
    but counts of existing ones keep growing.
    """
    cap = tokens.shape[0]
    first_child = np.full(cap, -1, np.int32)
    next_sibling = np.full(cap, -1, np.int32)
    root_first = -1
    n = 0
    for s in starts:
        node = -1
        for d in range(depth):
            p = s + d
            if p >= stream.shape[0] or stream[p] < 0:
                break
            t = stream[p]
            c = root_first if node == -1 else first_child[node]
            while c != -1 and tokens[c] != t:
                c = next_sibling[c]
            if c == -1:
                if n == cap:
                    break
                c = n
                n += 1
                tokens[c] = t
                parents[c] = node
                counts[c] = 0
                origins[c] = p
                if node == -1:
                    next_sibling[c] = root_first
                    root_first = c
                else:
                    next_sibling[c] = first_child[node]
                    first_child[node] = c
            counts[c] += 1
            node = c
    return n


@numba.njit(cache=True, nogil=True)
def top_nodes(counts: np.ndarray, n: int, budget: int, out: np.ndarray) -> int:
    """Select the ``budget`` nodes of ``counts[:n]`` ranked by (count desc, index asc).

    Writes the selected node indices in ascending order (hence topological order for a trie
    from ``build_trie``) into the caller-owned ``out`` (int64, length >= min(n, budget)) and
    returns how many were written. A child's count never exceeds its parent's and the parent
    wins ties by its smaller index, so the selection of a ``build_trie`` trie is closed under
    parent: it is a tree hanging from the same root.
    """
    k = min(n, budget)
    if k <= 0:
        return 0
    if k == n:
        for i in range(n):
            out[i] = i
        return n
    # c = the k-th largest count: keep every count above c, then the first ties in index order
    c = -np.partition(-counts[:n].astype(np.int64), k - 1)[k - 1]
    ties = k
    for i in range(n):
        if counts[i] > c:
            ties -= 1
    j = 0
    for i in range(n):
        if counts[i] > c or (counts[i] == c and ties > 0):
            if counts[i] == c:
                ties -= 1
            out[j] = i
            j += 1
    assert j == k
    return k


@numba.njit(cache=True, nogil=True)
def reindex_parents(parents: np.ndarray, keep: np.ndarray, k: int, out: np.ndarray) -> None:
    """Parents of the nodes ``keep[:k]`` (ascending, closed under parent) renumbered to
    their positions in ``keep``; -1 stays -1. Fills the caller-owned ``out[:k]`` (int32)."""
    new = np.full(keep[k - 1] + 1 if k else 0, -1, np.int32)
    for j in range(k):
        i = keep[j]
        new[i] = j
        p = parents[i]
        out[j] = -1 if p < 0 else new[p]
        assert p < 0 or out[j] >= 0
