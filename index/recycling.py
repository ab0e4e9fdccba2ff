"""Token recycling: the target's own recent top-k candidates as a draft source.

A ``vocab x k`` adjacency matrix (Token Recycling, Luo et al. 2024): row t holds the
target's top-k next tokens (best first) the last time t was an input token of a verified
position, -1 while t has not been seen. A draft grows from the last verified token by
following rows, best first by a path score (see ``TokenRecycling``). int32 rows keep the
matrix at 1.5 MB for a 49152-token vocabulary with k = 8.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _update(rows, inputs, topk):
    """rows[inputs[i]] = topk[i] in order, so later positions win."""
    for i in range(inputs.shape[0]):
        rows[inputs[i]] = topk[i]


@numba.njit(cache=True, nogil=True)
def _insert(vals, cols, v, j, p):
    """Put value v of column j into the sorted top list at or above position p."""
    while p > 0 and v > vals[p - 1]:
        vals[p] = vals[p - 1]
        cols[p] = cols[p - 1]
        p -= 1
    vals[p] = v
    cols[p] = j


CHUNK = 32  # columns whose maximum is checked at once: most chunks cannot enter the top list


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def top_k_rows(x: np.ndarray, out: np.ndarray) -> None:
    """out[i] = the columns of the k = out.shape[1] largest values of row x[i], largest first,
    the lower column first among equal values (x float [m, V] without NaN, V >= k; out
    int64 [m, k]).

    What fills the matrix after every verification. torch.topk took 0.70 ms for 17 rows of
    a 49152-token vocabulary on a 2-core CPU, as long as a few draft nodes cost to verify.
    Here rows run in parallel, and a chunk of a row is only looked into when its maximum
    beats the k-th best so far, which after the first chunks it seldom does: the pass runs
    near the speed of reading the row.
    """
    k = out.shape[1]
    n = x.shape[1]
    for i in numba.prange(x.shape[0]):
        vals = np.empty(k, x.dtype)
        cols = out[i]
        for j in range(k):  # the first k columns enter unconditionally
            _insert(vals, cols, x[i, j], j, j)
        j0 = k
        while j0 < n:
            j1 = min(j0 + CHUNK, n)
            best = x[i, j0]
            for j in range(j0 + 1, j1):
                best = max(best, x[i, j])
            if best > vals[k - 1]:
                for j in range(j0, j1):
                    if x[i, j] > vals[k - 1]:
                        _insert(vals, cols, x[i, j], j, k - 1)
            j0 = j1


@numba.njit(cache=True, nogil=True)
def _ranks(rows, after, tokens):
    """TokenRecycling.ranks over the matrix ``rows``."""
    k = rows.shape[1]
    out = np.empty(after.shape[0], np.int64)
    for i in range(after.shape[0]):
        row = rows[after[i]]
        if row[0] < 0:  # never filled
            out[i] = -1
            continue
        out[i] = k
        for j in range(k):
            if row[j] == tokens[i]:
                out[i] = j
                break
    return out


# Heap entries are candidate nodes: cost float64[cap] and ints int64[cap, 4] holding
# (rank sum, depth, parent node, column in the parent's row), also the tie-break order.
_RANK, _DEPTH, _PAR, _COL = 0, 1, 2, 3


@numba.njit(cache=True, nogil=True)
def _before(cost, ints, i, j):
    """Heap order: lower cost, then lower rank sum, shallower, earlier parent, column."""
    if cost[i] != cost[j]:
        return cost[i] < cost[j]
    for f in range(ints.shape[1]):
        if ints[i, f] != ints[j, f]:
            return ints[i, f] < ints[j, f]
    return False


@numba.njit(cache=True, nogil=True)
def _swap(cost, ints, i, j):
    cost[i], cost[j] = cost[j], cost[i]
    for f in range(ints.shape[1]):
        ints[i, f], ints[j, f] = ints[j, f], ints[i, f]


@numba.njit(cache=True, nogil=True)
def _push(cost, ints, size, weights, rank, depth, par, col):
    """Add a candidate to the heap of ``size`` entries; returns the new size."""
    i = size
    # from integers, not accumulated along the path, so equal (depth, rank sum) tie exactly
    cost[i] = depth * weights[0] + rank * weights[1]
    ints[i, _RANK], ints[i, _DEPTH], ints[i, _PAR], ints[i, _COL] = rank, depth, par, col
    while i > 0 and _before(cost, ints, i, (i - 1) // 2):
        _swap(cost, ints, i, (i - 1) // 2)
        i = (i - 1) // 2
    return size + 1


@numba.njit(cache=True, nogil=True)
def _pop(cost, ints, size):
    """Drop the top of the heap of ``size`` entries; returns the new size."""
    size -= 1
    _swap(cost, ints, 0, size)
    i = 0
    while True:
        c = 2 * i + 1
        if c >= size:
            return size
        if c + 1 < size and _before(cost, ints, c + 1, c):
            c += 1
        if not _before(cost, ints, c, i):
            return size
        _swap(cost, ints, i, c)
        i = c


@numba.njit(cache=True, nogil=True)
def _next_col(rows, row, col):
    """First filled column >= col of ``rows[row]``, or k when there is none."""
    while col < rows.shape[1] and rows[row, col] < 0:
        col += 1
    return col


@numba.njit(cache=True, nogil=True)
def _draft(rows, last, budget, weights, tokens, parents, scores):
    """Best-first tree from ``last`` following rows; fills the outputs, returns the size.

    A node at depth d with rank sum r costs d * weights[0] + r * weights[1] (both >= 0, so
    a child never costs less than its parent). Siblings in a row come in rank order, so
    only a node's best unexpanded child waits in the heap: popping (p, j) pushes (p, next j)
    and the new node's first child, and the heap never holds more than budget + 1 entries.
    """
    k = rows.shape[1]
    cost = np.empty(budget + 1, np.float64)
    ints = np.empty((budget + 1, 4), np.int64)
    size = 0
    j = _next_col(rows, last, 0)
    if j < k:
        size = _push(cost, ints, size, weights, j, 1, -1, j)
    n = 0
    while size > 0 and n < budget:
        c, r, d, p, j = cost[0], ints[0, _RANK], ints[0, _DEPTH], ints[0, _PAR], ints[0, _COL]
        size = _pop(cost, ints, size)
        row = last if p < 0 else tokens[p]
        tokens[n] = rows[row, j]
        parents[n] = p
        scores[n] = math.exp(-c)
        s = _next_col(rows, row, j + 1)
        if s < k:
            size = _push(cost, ints, size, weights, r - j + s, d, p, s)
        s = _next_col(rows, tokens[n], 0)
        if s < k:
            size = _push(cost, ints, size, weights, r + s, d + 1, n, s)
        n += 1
    return n


def _as_ids(x, name: str, ndim: int, vocab_size: int) -> np.ndarray:
    """Coerce to ``ndim``-D contiguous int32 ids in [0, vocab_size) or raise ValueError."""
    a = np.asarray(x)
    if a.ndim != ndim or not (a.dtype.kind in "iu" or a.size == 0):
        raise ValueError(
            f"{name} must be {ndim}-D integer token ids, got {a.dtype} {list(a.shape)}"
        )
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
        raise ValueError(
            f"{name} must be token ids in [0, {vocab_size}), got values in [{a.min()}, {a.max()}]"
        )
    return np.ascontiguousarray(a, np.int32)


class TokenRecycling:
    """The ``vocab x k`` matrix of the target's latest top-k after each token, and its drafts.

    Draft nodes are ranked by an acceptance guess: a node at depth d whose path takes
    columns (ranks, 0 = best) summing to r scores ``top1_rate ** d * rank_decay ** r``, as if
    each step were accepted with probability top1_rate when it is the target's top-1 and
    rank_decay times less per rank below. Both factors are in (0, 1], so a child never scores
    above its parent. The two rates are settings, to be calibrated against acceptance; they
    are not part of ``state()``.
    """

    def __init__(
        self, vocab_size: int, k: int = 8, top1_rate: float = 0.5, rank_decay: float = 0.5
    ) -> None:
        """An empty matrix (all -1) of ``vocab_size`` rows of ``k`` token ids."""
        if vocab_size < 1 or k < 1:
            raise ValueError(f"vocab_size and k must be >= 1, got {vocab_size} and {k}")
        self._check_rates(top1_rate, rank_decay)
        self._rows = np.full((vocab_size, k), -1, np.int32)
        self._touched = np.zeros(vocab_size, bool)  # rows updated since take_touched()
        self._weights = (-math.log(top1_rate), -math.log(rank_decay))

    @staticmethod
    def _check_rates(top1_rate: float, rank_decay: float) -> None:
        if not (0 < top1_rate <= 1 and 0 < rank_decay <= 1):
            raise ValueError(
                f"top1_rate and rank_decay must be in (0, 1], got {top1_rate} and {rank_decay}"
            )

    @property
    def vocab_size(self) -> int:
        return int(self._rows.shape[0])

    @property
    def k(self) -> int:
        return int(self._rows.shape[1])

    def ranks(self, after: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """int64 [n]: the column of ``tokens[i]`` in row ``after[i]`` (0: the target's top-1
        there), ``k`` where the row lacks it, -1 where that row was never filled."""
        return _ranks(self._rows, np.asarray(after), np.asarray(tokens))

    def update(self, input_tokens, topk) -> None:
        """Row ``input_tokens[i]`` becomes ``topk[i]`` (best first), for i in order.

        Call after each verification with every verified position, draft nodes included:
        ``input_tokens`` int[m] the token fed at each position, ``topk`` int[m, k] the
        target's top-k at that position (distinct ids, as a top-k is). Later positions win
        when a token repeats. Raises ValueError for wrong shapes or ids outside
        [0, vocab_size).
        """
        v = self.vocab_size
        inputs = _as_ids(input_tokens, "input_tokens", 1, v)
        top = _as_ids(topk, "topk", 2, v)
        if top.shape != (inputs.shape[0], self.k):
            raise ValueError(
                f"topk must have shape [len(input_tokens), k] = {[inputs.shape[0], self.k]}, "
                f"got {list(top.shape)}"
            )
        _update(self._rows, inputs, top)
        self._touched[inputs] = True

    def take_touched(self) -> np.ndarray:
        """int64 [m]: the rows updated since the last call (ascending), and forget them."""
        rows = np.flatnonzero(self._touched)
        self._touched[rows] = False
        return rows

    def set_rows(self, tokens: np.ndarray, rows: np.ndarray) -> None:
        """Row ``tokens[i]`` becomes ``rows[i]`` (as learned elsewhere), not marked touched."""
        self._rows[np.asarray(tokens, np.int64)] = rows

    def draft(self, last_token: int, budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``budget`` best-scoring nodes of the tree grown from ``last_token`` by rows.

        Children of a node with token t are the filled entries of row t. Returns fresh
        arrays (tokens int32[n], parents int32[n], scores float32[n]), n <= budget, in
        topological order (parents[i] < i, -1 = child of the root): the nodes by (score
        desc, rank sum asc, depth asc), a set closed under parent. Empty when the row of
        ``last_token`` is empty or budget is 0. Raises ValueError for a token outside
        [0, vocab_size) or a negative budget.
        """
        if not isinstance(last_token, (int, np.integer)) or not 0 <= last_token < self.vocab_size:
            raise ValueError(
                f"last_token must be an int in [0, {self.vocab_size}), got {last_token!r}"
            )
        if not isinstance(budget, (int, np.integer)) or budget < 0:
            raise ValueError(f"budget must be an int >= 0, got {budget!r}")
        tokens = np.empty(budget, np.int32)
        parents = np.empty(budget, np.int32)
        scores = np.empty(budget, np.float32)
        n = _draft(self._rows, int(last_token), int(budget), self._weights, tokens, parents, scores)
        return tokens[:n], parents[:n], scores[:n]

    def state(self) -> dict[str, np.ndarray]:
        """``{"rows": int32[vocab_size, k]}``, a view of the live matrix."""
        return {"rows": self._rows}

    @classmethod
    def from_state(
        cls, arrays: dict[str, np.ndarray], top1_rate: float = 0.5, rank_decay: float = 0.5
    ) -> TokenRecycling:
        """A matrix copied from ``state()`` arrays (read-only ones are fine).

        Raises ValueError unless ``arrays["rows"]`` is 2-D int32 with entries in
        [-1, vocab_size).
        """
        rows = np.asarray(arrays.get("rows")) if "rows" in arrays else None
        if rows is None or rows.dtype != np.int32 or rows.ndim != 2 or 0 in rows.shape:
            got = "nothing" if rows is None else f"{rows.dtype} {list(rows.shape)}"
            raise ValueError(f"recycling state 'rows' must be 2-D int32 [vocab, k], got {got}")
        if rows.min() < -1 or rows.max() >= rows.shape[0]:
            raise ValueError(
                f"recycling state 'rows' must hold ids in [-1, {rows.shape[0]}), got values in "
                f"[{rows.min()}, {rows.max()}]"
            )
        table = cls(rows.shape[0], rows.shape[1], top1_rate, rank_decay)
        table._rows[:] = rows
        return table
