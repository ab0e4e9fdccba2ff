"""Static suffix array over a large token stream (the corpus datastore, REST-style).

``build`` sorts the suffixes once (SA-IS, linear time); ``longest_match`` finds the SA
range of the longest suffix of the context that occurs in the stream; ``continuations``
turns a sample of that range into a counted draft tree.

Order of symbols: tokens compare by id; every separator (negative token) is a symbol of
its own, smaller than every token, and separators compare by their position in the stream;
the end of the stream is smaller still. So two different suffixes never agree on a
separator, and a common prefix of two suffixes (hence any match) never contains one.

``stream`` and ``sa`` may be read-only memory maps: nothing here writes into them.
"""

import operator

import numba
import numpy as np

from retrodraft.index.trie import build_trie, reindex_parents, top_nodes

# Token ids below max(this, n // 2) are ranked through a dense table (<= 4 bytes a token);
# larger ids through a sort of the distinct ids.
_DENSE_TABLE_MIN = 1 << 20


def build(stream: np.ndarray) -> np.ndarray:
    """Suffix array of ``stream`` (1-D int32, may be read-only or memory-mapped).

    Returns a new int64 array ``sa`` of length ``len(stream)``: ``sa[r]`` is the start of
    the r-th smallest suffix under the module's symbol order (separators below tokens,
    distinct from each other, ordered by position; end of stream lowest). Linear time;
    besides the result it holds an int64 rank of every token and a byte per token, plus
    about half of that again at the first recursion level.
    """
    stream = _readonly(stream, "stream", np.int32)
    n = stream.shape[0]
    sa = np.empty(n, np.int64)
    if n == 0:
        return sa
    text, k = _ranks(stream)
    _sais(text, sa, k)
    return sa


def longest_match(
    stream: np.ndarray, sa: np.ndarray, context: np.ndarray, max_len: int
) -> tuple[int, int, int]:
    """Longest suffix of ``context`` that occurs in ``stream``: ``(lo, hi, length)``.

    ``stream`` int32[n] and its suffix array ``sa`` int64[n] (from ``build``); ``context``
    1-D int32. ``length`` is the largest L <= max_len such that ``context[-L:]`` occurs in
    the stream, and ``sa[lo:hi]`` are the starts of all its occurrences. A negative token
    in the context matches nothing. When not even the last token occurs (or the context is
    empty, or max_len is 0) the result is ``(0, 0, 0)``.
    """
    stream = _readonly(stream, "stream", np.int32)
    sa = _readonly(sa, "sa", np.int64)
    context = _readonly(context, "context", np.int32)
    _same_length(stream, sa)
    max_len = _non_negative(max_len, "max_len")
    lo, hi, length = _longest_match(stream, sa, context, max_len)
    return int(lo), int(hi), int(length)


def continuations(
    stream: np.ndarray,
    sa: np.ndarray,
    lo: int,
    hi: int,
    length: int,
    max_positions: int,
    depth: int,
    budget: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counted tree of what follows the occurrences ``sa[lo:hi]`` of a ``length``-token match.

    Up to ``max_positions`` occurrences are used, spread evenly over the range (it is sorted
    by what follows, so this is a sample stratified by continuation). The ``depth`` tokens
    after each, cut at a separator or the end of the stream, go into a counted trie, and the
    ``budget`` nodes with the highest counts are returned (ties to the node created first),
    which always form a tree. Returns new arrays, all of length k <= budget:
      tokens  int32[k]    token ids
      parents int32[k]    parent index (< own index), -1 for children of the root
      scores  float32[k]  count / occurrences used: how often the path followed the match
      origins int64[k]    stream position the node's token was first copied from
    """
    stream = _readonly(stream, "stream", np.int32)
    sa = _readonly(sa, "sa", np.int64)
    _same_length(stream, sa)
    lo = _non_negative(lo, "lo")
    hi = _non_negative(hi, "hi")
    if not lo <= hi <= sa.shape[0]:
        raise ValueError(f"need 0 <= lo <= hi <= len(sa) = {sa.shape[0]}, got lo={lo} hi={hi}")
    length = _non_negative(length, "length")
    max_positions = _non_negative(max_positions, "max_positions")
    depth = _non_negative(depth, "depth")
    budget = _non_negative(budget, "budget")
    m = min(max_positions, hi - lo)
    return sampled_tree(m, depth, budget, lambda *out: _continuations(stream, sa, lo, hi, length, m, depth, *out))


def sampled_tree(m: int, depth: int, budget: int, fill) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The (tokens, parents, scores, origins) of a counted trie over ``m`` sampled
    continuations of up to ``depth`` tokens, at most ``budget`` nodes: buffers for the most
    nodes it can have, filled by ``fill(tokens, parents, scores, origins)`` (not called when
    that is 0), which returns how many it wrote; the buffers cut to that."""
    k = min(budget, m * depth)
    tokens = np.empty(k, np.int32)
    parents = np.empty(k, np.int32)
    scores = np.empty(k, np.float32)
    origins = np.empty(k, np.int64)
    if k:
        k = fill(tokens, parents, scores, origins)
    return tokens[:k], parents[:k], scores[:k], origins[:k]


def _readonly(a: np.ndarray, name: str, dtype: type) -> np.ndarray:
    """A contiguous read-only view of ``a`` (one compiled kernel for mapped and owned arrays)."""
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != dtype:
        got = f"{a.dtype} {list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be 1-D {np.dtype(dtype).name}, got {got}")
    v = np.ascontiguousarray(a).view()
    v.flags.writeable = False
    return v


def _same_length(stream: np.ndarray, sa: np.ndarray) -> None:
    if sa.shape[0] != stream.shape[0]:
        raise ValueError(
            f"sa must be the suffix array of stream (length {stream.shape[0]}), "
            f"got length {sa.shape[0]}"
        )


def _non_negative(x: int, name: str) -> int:
    try:
        x = operator.index(x)
    except TypeError:
        raise ValueError(f"{name} must be an int >= 0, got {type(x).__name__}") from None
    if x < 0:
        raise ValueError(f"{name} must be an int >= 0, got {x}")
    return x


# ---- construction --------------------------------------------------------------------------


def _ranks(stream: np.ndarray) -> tuple[np.ndarray, int]:
    """Stream as int64 symbols in [0, k): separators 0.. in stream order, then tokens by id."""
    text = np.empty(stream.shape[0], np.int64)
    top = int(stream.max())
    if top < max(_DENSE_TABLE_MIN, stream.shape[0] // 2):
        k = _dense_ranks(stream, np.zeros(max(top, -1) + 1, np.int64), text)
    else:
        k = _sorted_ranks(stream, np.unique(stream[stream >= 0]), text)
    return text, k


@numba.njit(cache=True, nogil=True)
def _dense_ranks(stream, table, text):
    """``table[v]`` (zeroed, covers every token id) marks, then holds, the rank of id v."""
    seps = 0
    for t in stream:
        if t < 0:
            seps += 1
        else:
            table[t] = 1
    r = seps
    for v in range(table.shape[0]):
        if table[v]:
            table[v] = r
            r += 1
    s = 0
    for i in range(stream.shape[0]):
        t = stream[i]
        if t < 0:
            text[i] = s
            s += 1
        else:
            text[i] = table[t]
    return r


@numba.njit(cache=True, nogil=True)
def _sorted_ranks(stream, ids, text):
    """``ids``: the distinct token ids, ascending."""
    s = 0
    for t in stream:
        if t < 0:
            s += 1
    seps = s
    s = 0
    for i in range(stream.shape[0]):
        t = stream[i]
        if t < 0:
            text[i] = s
            s += 1
        else:
            text[i] = seps + np.searchsorted(ids, t)
    return seps + ids.shape[0]


def _sais(text: np.ndarray, sa: np.ndarray, k: int) -> None:
    """SA-IS (Nong, Zhang & Chan 2009): ``sa`` <- suffix array of ``text`` (symbols in [0, k)).

    The end of the text is a virtual sentinel below every symbol. The reduced problem lives
    inside ``sa`` (names in its top half, its suffix array in the bottom), so each recursion
    level only adds its type bytes and buckets.
    """
    n = text.shape[0]
    stype = np.empty(n, np.uint8)
    bkt = np.empty(k, np.int64)
    n1, names = _sort_lms_substrings(text, sa, stype, bkt)
    if names < n1:
        _sais(sa[n - n1 :], sa[:n1], names)
    else:
        _invert(sa[n - n1 :], sa[:n1])
    _sort_from_lms(text, sa, stype, bkt, n1)


@numba.njit(cache=True, nogil=True)
def _is_lms(stype, i):
    return i > 0 and stype[i] == 1 and stype[i - 1] == 0


@numba.njit(cache=True, nogil=True)
def _bucket_bounds(text, bkt, tails):
    """``bkt[c]`` <- first slot of symbol c's bucket, or one past its last if ``tails``."""
    bkt[:] = 0
    for c in text:
        bkt[c] += 1
    total = 0
    for c in range(bkt.shape[0]):
        total += bkt[c]
        bkt[c] = total if tails else total - bkt[c]


@numba.njit(cache=True, nogil=True)
def _induce(text, sa, stype, bkt):
    """From LMS suffixes seeded at their bucket tails, induce L-type then S-type order."""
    n = text.shape[0]
    _bucket_bounds(text, bkt, False)
    # The sentinel sorts first and its predecessor n - 1 is L-type.
    c = text[n - 1]
    sa[bkt[c]] = n - 1
    bkt[c] += 1
    for i in range(n):
        j = sa[i] - 1
        if j >= 0 and stype[j] == 0:
            c = text[j]
            sa[bkt[c]] = j
            bkt[c] += 1
    _bucket_bounds(text, bkt, True)
    for i in range(n - 1, -1, -1):
        j = sa[i] - 1
        if j >= 0 and stype[j] == 1:
            c = text[j]
            bkt[c] -= 1
            sa[bkt[c]] = j


@numba.njit(cache=True, nogil=True)
def _sort_lms_substrings(text, sa, stype, bkt):
    """Classify suffixes, sort LMS substrings and name them.

    Leaves the reduced text (names, in position order) in ``sa[n - n1:]`` and returns
    (n1 = number of LMS positions, number of distinct names).
    """
    n = text.shape[0]
    # S-type: smaller than the suffix after it; the last suffix beats only the sentinel.
    stype[n - 1] = 0
    for i in range(n - 2, -1, -1):
        a, b = text[i], text[i + 1]
        stype[i] = 1 if a < b or (a == b and stype[i + 1] == 1) else 0
    sa[:] = -1
    _bucket_bounds(text, bkt, True)
    for i in range(n - 1, 0, -1):
        if _is_lms(stype, i):
            c = text[i]
            bkt[c] -= 1
            sa[bkt[c]] = i
    _induce(text, sa, stype, bkt)
    n1 = 0
    for i in range(n):
        if _is_lms(stype, sa[i]):
            sa[n1] = sa[i]
            n1 += 1
    # LMS positions are >= 1 and never adjacent: n1 <= n // 2, so slot n1 + p // 2 < n.
    sa[n1:] = -1
    names = 0
    prev = -1
    for i in range(n1):
        p = sa[i]
        if prev < 0 or not _same_lms_substring(text, stype, p, prev):
            names += 1
            prev = p
        sa[n1 + p // 2] = names - 1
    j = n - 1
    for i in range(n - 1, n1 - 1, -1):
        if sa[i] >= 0:
            sa[j] = sa[i]
            j -= 1
    return n1, names


@numba.njit(cache=True, nogil=True)
def _same_lms_substring(text, stype, p, q):
    n = text.shape[0]
    d = 0
    while True:
        a, b = p + d, q + d
        # The sentinel is unique, so a substring reaching it equals no other.
        if a == n or b == n:
            return False
        if text[a] != text[b] or stype[a] != stype[b]:
            return False
        # Types at a - 1 and b - 1 matched too, so b is LMS exactly when a is.
        if d > 0 and _is_lms(stype, a):
            return True
        d += 1


@numba.njit(cache=True, nogil=True)
def _invert(names, sa1):
    """All names distinct: the reduced suffix array is the inverse permutation."""
    for i in range(names.shape[0]):
        sa1[names[i]] = i


@numba.njit(cache=True, nogil=True)
def _sort_from_lms(text, sa, stype, bkt, n1):
    """``sa[:n1]`` holds the LMS suffixes' order (indices into the LMS list): finish ``sa``."""
    n = text.shape[0]
    j = n - n1
    for i in range(1, n):
        if _is_lms(stype, i):
            sa[j] = i
            j += 1
    for i in range(n1):
        sa[i] = sa[n - n1 + sa[i]]
    sa[n1:] = -1
    _bucket_bounds(text, bkt, True)
    # Right to left, so each LMS suffix moves to a slot at or after its own.
    for i in range(n1 - 1, -1, -1):
        p = sa[i]
        sa[i] = -1
        c = text[p]
        bkt[c] -= 1
        sa[bkt[c]] = p
    _induce(text, sa, stype, bkt)


# ---- queries -------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _compare(stream, p, context, a, b):
    """Sign of stream[p:] against the pattern ``context[a:b]`` (0: the pattern is a prefix)."""
    n = stream.shape[0]
    for d in range(b - a):
        if p + d == n:
            return -1
        s = stream[p + d]
        t = context[a + d]
        # A separator (s < 0) sorts below every token.
        if s != t:
            return -1 if s < t else 1
    return 0


@numba.njit(cache=True, nogil=True)
def _lower_bound(stream, sa, context, a, b, lo, hi, strict):
    """First r in [lo, hi) whose suffix compares >= 0 (> 0 if ``strict``) with the pattern."""
    while lo < hi:
        mid = (lo + hi) // 2
        c = _compare(stream, sa[mid], context, a, b)
        if c < 0 or (strict and c == 0):
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(cache=True, nogil=True)
def _longest_match(stream, sa, context, max_len):
    n = stream.shape[0]
    b = context.shape[0]
    # Negative context tokens match nothing, so the pattern starts after the last one.
    top = 0
    while top < min(max_len, b, n) and context[b - 1 - top] >= 0:
        top += 1
    # context[-L:] occurring implies every shorter suffix occurs: bisect on L.
    best, best_lo = 0, 0
    lo_len, hi_len = 1, top
    while lo_len <= hi_len:
        L = (lo_len + hi_len) // 2
        r = _lower_bound(stream, sa, context, b - L, b, 0, n, False)
        if r < n and _compare(stream, sa[r], context, b - L, b) == 0:
            best, best_lo = L, r
            lo_len = L + 1
        else:
            hi_len = L - 1
    if best == 0:
        return 0, 0, 0
    hi = _lower_bound(stream, sa, context, b - best, b, best_lo, n, True)
    return best_lo, hi, best


@numba.njit(cache=True, nogil=True)
def _continuations(stream, sa, lo, hi, length, m, depth, tokens, parents, scores, origins):
    r = hi - lo
    starts = np.empty(m, np.int64)
    for i in range(m):
        starts[i] = sa[lo + i * r // m] + length
    return counted_tree(stream, starts, depth, tokens, parents, scores, origins)


@numba.njit(cache=True, nogil=True)
def counted_tree(stream, starts, depth, tokens, parents, scores, origins):
    """The counted trie of ``stream[s : s + depth]`` for ``s`` in ``starts`` (inserted in that
    order), cut to its ``len(tokens)`` best nodes; fills the caller's outputs, returns k.

    Scores are count / len(starts); origins are stream positions. Shared with the sharded
    datastore's merge (index.shard_merge), which must reproduce this tree exactly.
    """
    m = starts.shape[0]
    cap = m * depth
    all_tokens = np.empty(cap, np.int32)
    all_parents = np.empty(cap, np.int32)
    counts = np.empty(cap, np.int32)
    all_origins = np.empty(cap, np.int64)
    n = build_trie(stream, starts, depth, all_tokens, all_parents, counts, all_origins)
    keep = np.empty(tokens.shape[0], np.int64)
    k = top_nodes(counts, n, tokens.shape[0], keep)
    reindex_parents(all_parents, keep, k, parents)
    for j in range(k):
        i = keep[j]
        tokens[j] = all_tokens[i]
        scores[j] = counts[i] / m
        origins[j] = all_origins[i]
    return k
