"""Online suffix trie with counts over many token sequences (SuffixDecoding).

Every suffix of every live sequence, cut to ``max_depth`` tokens, is a path from the root;
a node counts the suffixes that pass through it, so ``count(child) / count(parent)`` is how
often the text went on with the child's token after the parent's path. Used once per
request over its prompt and once globally over past outputs.

Layout (all caller-visible through ``state()``, all reused through free lists):
  nodes   int32[cap, 6]  TOK, PAR, CNT, CHILD (first child), NEXT, PREV (siblings);
                         row 0 is the root, whose CNT is the number of live tokens
  table   int32[H]       open-addressing hash (linear probing, H a power of two) of the
                         nodes keyed by (PAR, TOK); -1 is an empty slot
  entries int32[E, 2]    one per live token: E_NODE, the deepest node of the suffix
                         starting at that token, and E_NEXT, the sequence's next token
  seqs    int64[S, 6]    per sequence slot: S_ID (-1 if free), S_HEAD, S_TAIL, S_ACT (first
                         active entry), S_NACT, S_LEN (live tokens)
  meta    int64[8]       settings and the free-list heads, see M_*

A sequence's entries form a linked list in token order; its last S_NACT entries are its
active suffixes (shorter than max_depth), which are the only ones a new token extends.
"""

from __future__ import annotations

import numba
import numpy as np

TOK, PAR, CNT, CHILD, NEXT, PREV = range(6)
E_NODE, E_NEXT = range(2)
S_ID, S_HEAD, S_TAIL, S_ACT, S_NACT, S_LEN = range(6)
# meta: settings, next sequence id, node high-water mark / free-list head / live count
# (root excluded), entry high-water mark / free-list head
(M_DEPTH, M_MAX_TOKENS, M_NEXT_ID, M_NODE_HW, M_NODE_FREE, M_NODE_LIVE,
 M_ENTRY_HW, M_ENTRY_FREE) = range(8)
ROOT = 0
_INT32_MAX = np.iinfo(np.int32).max


@numba.njit(cache=True)
def _home(parent: int, token: int, mask: int) -> int:
    k = (np.uint64(parent) << np.uint64(32)) | np.uint64(token)
    return np.int64((k * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)) & mask


@numba.njit(cache=True)
def _find(nodes, table, parent, token):
    mask = table.shape[0] - 1
    i = _home(parent, token, mask)
    while True:
        c = table[i]
        if c == -1:
            return -1
        if nodes[c, PAR] == parent and nodes[c, TOK] == token:
            return c
        i = (i + 1) & mask


@numba.njit(cache=True)
def _insert(nodes, table, c):
    mask = table.shape[0] - 1
    i = _home(nodes[c, PAR], nodes[c, TOK], mask)
    while table[i] != -1:
        i = (i + 1) & mask
    table[i] = c


@numba.njit(cache=True)
def _delete(nodes, table, c):
    mask = table.shape[0] - 1
    i = _home(nodes[c, PAR], nodes[c, TOK], mask)
    while table[i] != c:
        i = (i + 1) & mask
    # Backward-shift deletion: no tombstones, so probe chains never outgrow the live load.
    j = i
    while True:
        j = (j + 1) & mask
        x = table[j]
        if x == -1:
            break
        h = _home(nodes[x, PAR], nodes[x, TOK], mask)
        # x may move into the hole at i unless its home lies cyclically in (i, j]
        if (i <= j and (h <= i or h > j)) or (i > j and h <= i and h > j):
            table[i] = x
            i = j
    table[i] = -1


@numba.njit(cache=True)
def _rehash(nodes, hw, table):
    # node rows in order (freed rows and the root have PAR -1): sequential reads
    for c in range(1, hw):
        if nodes[c, PAR] != -1:
            _insert(nodes, table, c)


@numba.njit(cache=True)
def _take(meta, free, hw, rows, next_col):
    """A row of ``rows``: the head of its free list (``meta[free]``, chained through column
    ``next_col``) if any, else the next never-used row (``meta[hw]``)."""
    i = meta[free]
    if i != -1:
        meta[free] = rows[i, next_col]
    else:
        i = meta[hw]
        meta[hw] += 1
    return i


@numba.njit(cache=True)
def _child(nodes, table, meta, parent, token):
    """The child of ``parent`` for ``token``, created with count 0 if missing."""
    c = _find(nodes, table, parent, token)
    if c != -1:
        return c
    c = _take(meta, M_NODE_FREE, M_NODE_HW, nodes, NEXT)
    meta[M_NODE_LIVE] += 1
    first = nodes[parent, CHILD]
    nodes[c, TOK] = token
    nodes[c, PAR] = parent
    nodes[c, CNT] = 0
    nodes[c, CHILD] = -1
    nodes[c, NEXT] = first
    nodes[c, PREV] = -1
    if first != -1:
        nodes[first, PREV] = c
    nodes[parent, CHILD] = c
    _insert(nodes, table, c)
    return c


@numba.njit(cache=True)
def _free(nodes, table, meta, c):
    assert nodes[c, CHILD] == -1  # children count <= parent count, so they went first
    _delete(nodes, table, c)
    nxt, prv = nodes[c, NEXT], nodes[c, PREV]
    if prv == -1:
        nodes[nodes[c, PAR], CHILD] = nxt
    else:
        nodes[prv, NEXT] = nxt
    if nxt != -1:
        nodes[nxt, PREV] = prv
    nodes[c, TOK] = -1
    nodes[c, PAR] = -1
    nodes[c, NEXT] = meta[M_NODE_FREE]
    meta[M_NODE_FREE] = c
    meta[M_NODE_LIVE] -= 1


@numba.njit(cache=True)
def _append(nodes, table, entries, seqs, meta, s, tokens):
    """Append ``tokens`` to sequence slot ``s``; returns how many fit before a resize.

    Stops early (for the caller to grow the arrays) unless there is room for max_depth new
    nodes and one entry, so one token never half-updates the tree.
    """
    d = meta[M_DEPTH]
    for k in range(tokens.shape[0]):
        live = meta[M_NODE_LIVE] + 1
        if nodes.shape[0] - live < d or 2 * (live + d) > table.shape[0]:
            return k
        if nodes[ROOT, CNT] >= entries.shape[0]:
            return k
        e = _take(meta, M_ENTRY_FREE, M_ENTRY_HW, entries, E_NEXT)
        entries[e, E_NODE] = ROOT
        entries[e, E_NEXT] = -1
        if seqs[s, S_TAIL] == -1:
            seqs[s, S_HEAD] = e
        else:
            entries[seqs[s, S_TAIL], E_NEXT] = e
        seqs[s, S_TAIL] = e
        if seqs[s, S_NACT] == 0:
            seqs[s, S_ACT] = e
        seqs[s, S_NACT] += 1
        seqs[s, S_LEN] += 1
        nodes[ROOT, CNT] += 1
        t = tokens[k]
        a = seqs[s, S_ACT]
        while a != -1:
            c = _child(nodes, table, meta, entries[a, E_NODE], t)
            nodes[c, CNT] += 1
            entries[a, E_NODE] = c
            a = entries[a, E_NEXT]
        # the oldest active suffix just reached max_depth and is final
        if seqs[s, S_NACT] == d:
            seqs[s, S_ACT] = entries[seqs[s, S_ACT], E_NEXT]
            seqs[s, S_NACT] -= 1
    return tokens.shape[0]


@numba.njit(cache=True)
def _trim(nodes, table, entries, seqs, meta, s, n):
    """Drop the oldest ``n`` tokens of sequence slot ``s`` (the suffixes starting there)."""
    assert n <= seqs[s, S_LEN]
    for _ in range(n):
        e = seqs[s, S_HEAD]
        # the active entries are the last S_NACT, so the head is active iff all are
        if seqs[s, S_LEN] == seqs[s, S_NACT]:
            seqs[s, S_ACT] = entries[e, E_NEXT]
            seqs[s, S_NACT] -= 1
        seqs[s, S_HEAD] = entries[e, E_NEXT]
        if seqs[s, S_HEAD] == -1:
            seqs[s, S_TAIL] = -1
        seqs[s, S_LEN] -= 1
        c = entries[e, E_NODE]
        while c != ROOT:
            p = nodes[c, PAR]
            nodes[c, CNT] -= 1
            if nodes[c, CNT] == 0:
                _free(nodes, table, meta, c)
            c = p
        nodes[ROOT, CNT] -= 1
        entries[e, E_NEXT] = meta[M_ENTRY_FREE]
        meta[M_ENTRY_FREE] = e


@numba.njit(cache=True)
def _walk(nodes, table, path):
    """The node spelled by ``path`` from the root, or -1."""
    c = ROOT
    for t in path:
        c = _find(nodes, table, c, t)
        if c == -1:
            return -1
    return c


@numba.njit(cache=True)
def _match(nodes, table, context, max_len):
    n = context.shape[0]
    # A path's suffixes are paths too (they start later in the same sequence), so "the last
    # m tokens are a path" is monotone in m and can be binary searched.
    lo, hi, node = 0, min(max_len, n), ROOT
    while lo < hi:
        m = (lo + hi + 1) // 2
        c = _walk(nodes, table, context[n - m:])
        if c == -1:
            hi = m - 1
        else:
            lo, node = m, c
    return node, lo


@numba.njit(cache=True)
def _sift_up(score, order, i):
    s, o = score[i], order[i]
    while i > 0:
        p = (i - 1) >> 1
        if score[p] > s or (score[p] == s and order[p] < o):
            break
        score[i], order[i] = score[p], order[p]
        i = p
    score[i], order[i] = s, o


@numba.njit(cache=True)
def _sift_down(score, order, size):
    s, o = score[0], order[0]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= size:
            break
        r = c + 1
        if r < size and (score[r] > score[c] or (score[r] == score[c] and order[r] < order[c])):
            c = r
        if s > score[c] or (s == score[c] and o < order[c]):
            break
        score[i], order[i] = score[c], order[c]
        i = c
    score[i], order[i] = s, o


@numba.njit(cache=True)
def _double(a):
    return np.concatenate((a, np.empty_like(a)))


@numba.njit(cache=True)
def _draft(nodes, table, context, max_match, budget, min_prob, out_tok, out_par, out_score):
    """Best-first expansion below the longest matched suffix; returns (n written, match len).

    Max-heap of candidates keyed by (score, push order): push order breaks ties, so a run is
    deterministic given the arrays. pushed_node/pushed_at hold each push's node and the
    output index of its parent (-1: the matched node).
    """
    u, m = _match(nodes, table, context, max_match)
    if m == 0 or budget == 0:
        return 0, m
    score = np.empty(4 * budget, np.float64)
    order = np.empty(4 * budget, np.int64)
    pushed_node = np.empty(4 * budget, np.int32)
    pushed_at = np.empty(4 * budget, np.int32)
    size = 0
    pushes = 0
    n = 0
    node, at, s = u, -1, 1.0
    while True:
        cu = nodes[node, CNT]
        c = nodes[node, CHILD]
        while c != -1:
            sc = s * nodes[c, CNT] / cu
            if sc >= min_prob:
                if pushes == pushed_node.shape[0]:
                    score, order = _double(score), _double(order)
                    pushed_node, pushed_at = _double(pushed_node), _double(pushed_at)
                pushed_node[pushes] = c
                pushed_at[pushes] = at
                score[size], order[size] = sc, pushes
                _sift_up(score, order, size)
                size += 1
                pushes += 1
            c = nodes[c, NEXT]
        if size == 0:
            break
        s, o = score[0], order[0]
        size -= 1
        score[0], order[0] = score[size], order[size]
        _sift_down(score, order, size)
        node = pushed_node[o]
        out_tok[n] = nodes[node, TOK]
        out_par[n] = pushed_at[o]
        out_score[n] = s
        at = n
        n += 1
        if n == budget:
            break
    return n, m


def _as_tokens(x, name: str) -> np.ndarray:
    """Coerce to 1-D contiguous int32 of non-negative ids or raise ValueError."""
    a = np.asarray(x)
    if a.ndim == 1 and a.size == 0:
        return np.empty(0, np.int32)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be 1-D integer token ids, got {a.dtype} {list(a.shape)}")
    if a.dtype != np.int32:
        lo, hi = a.min(), a.max()
        if lo < 0 or hi > _INT32_MAX:
            bad = int(lo) if lo < 0 else int(hi)
            raise ValueError(f"{name} must be token ids in [0, 2**31), got {bad}")
        a = a.astype(np.int32)
    elif a.min() < 0:
        i = int(np.argmax(a < 0))
        raise ValueError(f"{name} must be non-negative token ids, got {int(a[i])} at index {i}")
    return np.ascontiguousarray(a)


class SuffixTree:
    """Depth-capped suffix trie with counts over live token sequences, under a token budget.

    Appending one token touches at most ``max_depth`` nodes. When live tokens would exceed
    ``max_tokens``, whole sequences are evicted oldest first (by ``add_sequence`` order),
    never the one being appended to; if that is not enough, the appended sequence loses its
    own oldest tokens, so a single long sequence becomes a sliding window. Node, hash and
    entry arrays grow geometrically when full and are reused through free lists, so memory
    stays bounded by the peak of live tokens times ``max_depth``.
    """

    _INIT_NODES = 256

    def __init__(self, max_depth: int = 64, max_tokens: int = 1 << 20) -> None:
        """Cheap (a few small allocations): fine to build one per request."""
        if not 1 <= max_depth <= 1 << 16:
            raise ValueError(f"max_depth must be in [1, 65536], got {max_depth}")
        if not 1 <= max_tokens <= _INT32_MAX:
            raise ValueError(f"max_tokens must be in [1, 2**31), got {max_tokens}")
        self._nodes = np.empty((self._INIT_NODES, 6), np.int32)
        self._nodes[ROOT] = (-1, -1, 0, -1, -1, -1)
        self._table = np.full(2 * self._INIT_NODES, -1, np.int32)
        self._entries = np.empty((self._INIT_NODES // 4, 2), np.int32)
        self._seqs = np.full((4, 6), -1, np.int64)
        self._meta = np.array([max_depth, max_tokens, 0, 1, -1, 0, 0, -1], np.int64)
        self._slots: dict[int, int] = {}  # live sequence id -> row of seqs, oldest first
        self._free_slots = [3, 2, 1, 0]

    @property
    def max_depth(self) -> int:
        return int(self._meta[M_DEPTH])

    @property
    def max_tokens(self) -> int:
        return int(self._meta[M_MAX_TOKENS])

    @property
    def num_nodes(self) -> int:
        """Live nodes, not counting the root."""
        return int(self._meta[M_NODE_LIVE])

    @property
    def nbytes(self) -> int:
        """Bytes the tree's arrays take now (allocated, not only used)."""
        return self._nodes.nbytes + self._table.nbytes + self._entries.nbytes + self._seqs.nbytes + self._meta.nbytes

    def __len__(self) -> int:
        """Live tokens over all sequences (never more than max_tokens)."""
        return int(self._nodes[ROOT, CNT])

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._slots

    def live_sequences(self) -> dict[int, int]:
        """Live sequence id -> its live token count, oldest first."""
        return {i: int(self._seqs[s, S_LEN]) for i, s in self._slots.items()}

    def add_sequence(self, tokens=None) -> int:
        """Start a new sequence (optionally with ``tokens``, as ``append``); returns its id.

        Ids increase and are never reused; eviction order is the order of this call.
        """
        tokens = None if tokens is None else _as_tokens(tokens, "tokens")
        if not self._free_slots:
            old = self._seqs.shape[0]
            self._seqs = np.concatenate((self._seqs, np.full((old, 6), -1, np.int64)))
            self._free_slots = list(range(2 * old - 1, old - 1, -1))
        slot = self._free_slots.pop()
        seq_id = int(self._meta[M_NEXT_ID])
        self._meta[M_NEXT_ID] += 1
        self._seqs[slot] = (seq_id, -1, -1, -1, 0, 0)
        self._slots[seq_id] = slot
        if tokens is not None:
            self.append(seq_id, tokens)
        return seq_id

    def append(self, seq_id: int, tokens) -> None:
        """Append ``tokens`` (1-D non-negative integer ids, any number) to a live sequence.

        One Numba call unless the arrays must grow. May evict older sequences, or the
        oldest tokens of this one, to stay within max_tokens (see the class docstring).
        Raises KeyError if ``seq_id`` is not live (never added, removed or evicted; test
        with ``in``), ValueError for bad tokens.
        """
        tokens = _as_tokens(tokens, "tokens")
        slot = self._slot(seq_id)
        tokens = self._make_room(slot, tokens)
        while tokens.shape[0]:
            k = _append(
                self._nodes, self._table, self._entries, self._seqs, self._meta, slot, tokens
            )
            tokens = tokens[k:]
            if tokens.shape[0]:
                self._grow(tokens.shape[0])

    def remove(self, seq_id: int) -> None:
        """Remove a live sequence: its suffixes leave the counts, emptied nodes are freed.

        Raises KeyError if ``seq_id`` is not live.
        """
        slot = self._slot(seq_id)
        del self._slots[seq_id]
        self._drop_oldest(slot, int(self._seqs[slot, S_LEN]))
        self._seqs[slot] = -1
        self._free_slots.append(slot)

    def count(self, path) -> int:
        """Number of live suffixes (cut to max_depth) that start with ``path``; 0 if none.

        The empty path counts every suffix, i.e. ``len(self)``.
        """
        path = _as_tokens(path, "path")
        if path.shape[0] > self.max_depth:
            return 0
        c = _walk(self._nodes, self._table, path)
        return 0 if c == -1 else int(self._nodes[c, CNT])

    def match(self, context, max_len: int | None = None) -> tuple[int, int]:
        """(node, length) of the longest suffix of ``context`` that is a path from the root.

        ``length`` is at most ``max_len`` (default and upper limit: max_depth); length 0
        with the root node (0) means nothing matched. The node id is valid until the next
        append or remove.
        """
        context = _as_tokens(context, "context")
        node, m = _match(self._nodes, self._table, context, self._max_len(max_len))
        return int(node), int(m)

    def draft(
        self, context, budget: int, min_prob: float = 0.0, max_match: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Draft tree of up to ``budget`` nodes continuing ``context``.

        Matches the longest suffix of ``context`` of at most ``max_match`` tokens (default
        max_depth // 2: a longer match leaves paths too short to draft from, as paths stop
        at max_depth), then expands best first below it. A node's score is the product of
        count(child) / count(parent) along its path from the matched node; nodes scoring
        below ``min_prob`` are left out. Because scores only shrink along a path, the result
        is the ``budget`` best-scoring nodes below the match (ties broken deterministically).

        Returns new arrays (caller owns them) in topological order and the match length:
          tokens  int32[n]    draft token ids
          parents int32[n]    parent index, -1 for children of the matched node
          scores  float32[n]  path scores, non-increasing in n
          match_len int       length of the matched suffix, 0 if nothing matched
        n is 0 when nothing matches or ``budget`` is 0.
        """
        context = _as_tokens(context, "context")
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {min_prob}")
        if max_match is None:
            max_match = max(1, self.max_depth // 2)
        tokens = np.empty(budget, np.int32)
        parents = np.empty(budget, np.int32)
        scores = np.empty(budget, np.float32)
        n, m = _draft(
            self._nodes, self._table, context, self._max_len(max_match),
            budget, float(min_prob), tokens, parents, scores,
        )
        return tokens[:n], parents[:n], scores[:n], int(m)

    def state(self) -> dict[str, np.ndarray]:
        """The arrays that make up the tree (see the module docstring), for persisting.

        Views into the live arrays, not copies: write them out before the next append or
        remove. Unused capacity is cut off except for the hash table, whose slots depend
        on its size.
        """
        return {
            "nodes": self._nodes[: self._meta[M_NODE_HW]],
            "table": self._table,
            "entries": self._entries[: self._meta[M_ENTRY_HW]],
            "seqs": self._seqs,
            "meta": self._meta,
        }

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray]) -> SuffixTree:
        """Rebuild a tree from ``state()``'s arrays (which may be read-only memory maps).

        Copies every array once into the tree's own writable arrays; the inputs are not
        kept. Checks dtypes, shapes and the bookkeeping in meta, and trusts the contents.
        """
        expect = {
            "nodes": (np.int32, 2, 6), "table": (np.int32, 1, None),
            "entries": (np.int32, 2, 2), "seqs": (np.int64, 2, 6), "meta": (np.int64, 1, 8),
        }
        missing = sorted(set(expect) - set(arrays))
        if missing:
            raise ValueError(f"state must have arrays {sorted(expect)}, missing {missing}")
        for name, (dtype, ndim, width) in expect.items():
            a = arrays[name]
            if a.dtype != dtype or a.ndim != ndim or (width is not None and a.shape[-1] != width):
                shape = "[n]" if width is None else f"[n, {width}]" if ndim == 2 else f"[{width}]"
                raise ValueError(
                    f"state[{name!r}] must be {np.dtype(dtype)} {shape}, "
                    f"got {a.dtype} {list(a.shape)}"
                )
        meta = arrays["meta"]
        h = arrays["table"].shape[0]
        if (
            meta[M_NODE_HW] != arrays["nodes"].shape[0]
            or meta[M_ENTRY_HW] != arrays["entries"].shape[0]
            or meta[M_NODE_HW] < 1 or meta[M_DEPTH] < 1
            or h < 2 or h & (h - 1) or 2 * meta[M_NODE_LIVE] > h
        ):
            raise ValueError(
                f"state is inconsistent: meta {meta.tolist()} with {arrays['nodes'].shape[0]} "
                f"nodes, {arrays['entries'].shape[0]} entries, a table of {h}"
            )
        tree = cls.__new__(cls)
        tree._nodes = np.array(arrays["nodes"])
        tree._table = np.array(arrays["table"])
        tree._entries = np.array(arrays["entries"])
        tree._seqs = np.array(arrays["seqs"])
        tree._meta = np.array(meta)
        ids = tree._seqs[:, S_ID]
        live = np.flatnonzero(ids >= 0)
        live = live[np.argsort(ids[live], kind="stable")]
        tree._slots = {int(ids[s]): int(s) for s in live}
        tree._free_slots = np.flatnonzero(ids < 0)[::-1].tolist()
        return tree

    def _slot(self, seq_id: int) -> int:
        slot = self._slots.get(seq_id)
        if slot is None:
            raise KeyError(f"no live sequence {seq_id} (never added, removed or evicted)")
        return slot

    def _max_len(self, max_len: int | None) -> int:
        if max_len is None:
            return self.max_depth
        if max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {max_len}")
        return min(max_len, self.max_depth)

    def _make_room(self, slot: int, tokens: np.ndarray) -> np.ndarray:
        """Evict so that ``tokens`` fit the budget; returns the tokens still to append."""
        excess = len(self) + tokens.shape[0] - self.max_tokens
        if excess <= 0:
            return tokens
        victims = []
        for seq_id, s in self._slots.items():
            if excess <= 0:
                break
            if s != slot:
                victims.append(seq_id)
                excess -= int(self._seqs[s, S_LEN])
        for seq_id in victims:
            self.remove(seq_id)
        if excess <= 0:
            return tokens
        k = min(excess, int(self._seqs[slot, S_LEN]))
        self._drop_oldest(slot, k)
        # the suffixes starting at the first new tokens would be trimmed right away
        return tokens[excess - k:]

    def _drop_oldest(self, slot: int, n: int) -> None:
        _trim(self._nodes, self._table, self._entries, self._seqs, self._meta, slot, n)

    def _grow(self, pending: int) -> None:
        """Make room for at least one more token, better for ``pending`` of them.

        A token needs up to max_depth new nodes and one entry. Arrays at least double, so
        growth is amortised O(1); a large append reserves for up to 16384 tokens at once,
        so a per-request prompt is usually indexed without any regrowth.
        """
        d = self.max_depth
        live = int(self._meta[M_NODE_LIVE]) + 1
        hw = int(self._meta[M_NODE_HW])
        cap = self._nodes.shape[0]
        if cap - live < d or 2 * (live + d) > self._table.shape[0]:
            cap = max(2 * cap, live + d * min(pending, 1 << 14))
            nodes = np.empty((cap, 6), np.int32)
            nodes[:hw] = self._nodes[:hw]
            self._nodes = nodes
            h = self._table.shape[0]
            while h < 2 * cap:
                h *= 2
            if h > self._table.shape[0]:
                self._table = np.full(h, -1, np.int32)
                _rehash(self._nodes, hw, self._table)
        if len(self) >= self._entries.shape[0]:
            ehw = int(self._meta[M_ENTRY_HW])
            e = max(2 * self._entries.shape[0], min(pending, 1 << 14))
            entries = np.empty((e, 2), np.int32)
            entries[:ehw] = self._entries[:ehw]
            self._entries = entries
