"""N-gram table: the most frequent next tokens after each n-gram (n = 1..max_n) of a stream.

An open-addressing hash table (linear probing, power-of-two size, doubled when more than
half full) of n-grams, each pointing to a row of its most frequent continuations; all in
flat arrays (see ``NgramTable.state``) so it can live in a memory map and be filled by
Numba. A stored n-gram costs 4 * (max_n + 1) bytes per slot (2-4 slots each) plus a
12 * top_k byte row: about 150 bytes for the defaults.

Bounded memory (Space-Saving, Metwally et al. 2005): an n-gram keeps ``top_k`` counters. A
new continuation takes a free counter, or else replaces the smallest counter c_min with
count c_min + 1 and error c_min. With T = sum of the n-gram's counts (its exact number of
occurrences followed by a token), for every kept token x:
  counts[x] - errors[x] <= true count of x <= counts[x],   errors[x] <= T / top_k,
and every token whose true count exceeds T / top_k is kept. Nothing is ever replaced while
an n-gram has at most ``top_k`` distinct continuations, so its counts are exact.

With ``max_ngrams`` set the number of n-grams is bounded too, so the whole table lives in
fixed memory (``bytes_for``): when it is full, the half of its n-grams with the fewest
occurrences is dropped (the long tail that repeats stays; one-off n-grams come and go). The
guarantee above then holds for an n-gram's occurrences since it was last (re)inserted.
"""

from __future__ import annotations

import numba
import numpy as np

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xFF51AFD7ED558CCD)
_S32 = np.uint64(32)
_MAX_COUNT = 2**31 - 1
# A slot is taken for an n-gram only while at most half the table is full, so probes stay
# short and every probe sequence reaches an empty slot.
_MAX_LOAD = 0.5


@numba.njit(cache=True, nogil=True)
def _probe(slots, seq, lo, n):
    """Slot holding the n-gram ``seq[lo : lo + n]``, or the empty slot where it would go."""
    h = np.uint64(n) * _M1
    for i in range(n):
        h = (h ^ np.uint64(np.uint32(seq[lo + i]))) * _M2
        h ^= h >> _S32
    mask = slots.shape[0] - 1
    width = slots.shape[1] - 1
    s = np.int64(h & np.uint64(mask))
    while slots[s, width] >= 0:
        i = 0
        while i < n and slots[s, i] == seq[lo + i]:
            i += 1
        if i == n and (n == width or slots[s, n] < 0):
            return s
        s = (s + 1) & mask
    return s


@numba.njit(cache=True, nogil=True)
def _observe(tokens, counts, errors, t):
    """Space-Saving step for one continuation ``t`` of one n-gram (rows of length top_k)."""
    k = tokens.shape[0]
    i = 0
    while i < k and tokens[i] >= 0 and tokens[i] != t:
        i += 1
    if i < k and tokens[i] == t:
        counts[i] += 1
    elif i < k:
        tokens[i] = t
        counts[i] = 1
        errors[i] = 0
    else:
        # rows are sorted by (count desc, token asc): the last entry has the smallest count
        i = k - 1
        tokens[i] = t
        errors[i] = counts[i]
        counts[i] += 1
    while i > 0 and (
        counts[i] > counts[i - 1] or (counts[i] == counts[i - 1] and tokens[i] < tokens[i - 1])
    ):
        tokens[i], tokens[i - 1] = tokens[i - 1], tokens[i]
        counts[i], counts[i - 1] = counts[i - 1], counts[i]
        errors[i], errors[i - 1] = errors[i - 1], errors[i]
        i -= 1


@numba.njit(cache=True, nogil=True)
def _insert(slots, tokens, counts, errors, stream, start, used, max_used):
    """Count every (n-gram, next token) pair whose next token is at ``stream[start:]``.

    Positions before ``start`` are context only. Stops before a position whose n-grams
    might take the number of n-grams past ``max_used``; returns (that position or
    len(stream), n-grams stored).
    """
    max_n = slots.shape[1] - 1
    for p in range(start, stream.shape[0]):
        t = stream[p]
        if t < 0:
            continue
        if used + max_n > max_used:
            return p, used
        for n in range(1, max_n + 1):
            if p - n < 0 or stream[p - n] < 0:
                break
            s = _probe(slots, stream, p - n, n)
            if slots[s, max_n] < 0:
                slots[s, :n] = stream[p - n : p]
                slots[s, max_n] = used
                used += 1
            r = slots[s, max_n]
            _observe(tokens[r], counts[r], errors[r], t)
    return stream.shape[0], used


@numba.njit(cache=True, nogil=True)
def _rehash(slots, bigger):
    """Move every n-gram of ``slots`` into the empty, larger ``bigger``."""
    max_n = slots.shape[1] - 1
    for s in range(slots.shape[0]):
        if slots[s, max_n] >= 0:
            n = 0
            while n < max_n and slots[s, n] >= 0:
                n += 1
            bigger[_probe(bigger, slots[s], 0, n)] = slots[s]


@numba.njit(cache=True, nogil=True)
def _lookup(slots, tokens, counts, context, out_tokens, out_counts):
    """Continuations of the longest suffix of ``context`` in the table: returns (n, k)."""
    max_n = slots.shape[1] - 1
    m = context.shape[0]
    top = 0
    while top < max_n and top < m and context[m - 1 - top] >= 0:
        top += 1
    for n in range(top, 0, -1):
        r = slots[_probe(slots, context, m - n, n), max_n]
        if r >= 0:
            k = 0
            while k < tokens.shape[1] and tokens[r, k] >= 0:
                out_tokens[k] = tokens[r, k]
                out_counts[k] = counts[r, k]
                k += 1
            return n, k
    return 0, 0


def _as_stream(x, name: str) -> np.ndarray:
    """Coerce to 1-D contiguous int32 (negative = separator) or raise ValueError."""
    a = np.asarray(x)
    if a.ndim != 1 or not (a.dtype.kind in "iu" or a.size == 0):
        raise ValueError(f"{name} must be 1-D integer token ids, got {a.dtype} {list(a.shape)}")
    if a.size and a.dtype != np.int32 and (a.min() < -(2**31) or a.max() >= 2**31):
        raise ValueError(f"{name} must fit in int32, got values in [{a.min()}, {a.max()}]")
    return np.ascontiguousarray(a, np.int32)


def _values(rows: int, top_k: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.full((rows, top_k), -1, np.int32),
        "counts": np.zeros((rows, top_k), np.int32),
        "errors": np.zeros((rows, top_k), np.int32),
    }


class NgramTable:
    """Most frequent continuations of every n-gram (n = 1..max_n) of a growing token stream.

    Negative tokens are separators: no n-gram and no continuation crosses one. Counts are
    exact for n-grams with at most ``top_k`` distinct continuations and Space-Saving
    estimates beyond (see the module docstring for the guarantee).
    """

    def __init__(self, max_n: int = 4, top_k: int = 8, capacity: int = 1024, max_ngrams: int | None = None) -> None:
        """An empty table with room for ``capacity`` n-grams before it first grows, and never
        more than ``max_ngrams`` of them (None: unbounded; else at least 4 * max_n)."""
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_ngrams is not None and max_ngrams < 4 * max_n:
            raise ValueError(f"max_ngrams must be at least 4 * max_n = {4 * max_n}, got {max_ngrams}")
        if max_ngrams is not None:
            capacity = min(capacity, max_ngrams)
        slots = 1 << max(1, int(2 * capacity - 1).bit_length())
        self._a = {
            "slots": np.full((slots, max_n + 1), -1, np.int32),
            **_values(capacity + max_n, top_k),
            "tail": np.full(max_n, -1, np.int32),
            "seen": np.zeros(1, np.int64),
        }
        self._used = 0
        self._owned = True
        self.max_ngrams = max_ngrams
        self._out_tokens = np.empty(top_k, np.int32)
        self._out_counts = np.empty(top_k, np.int32)

    @classmethod
    def build(cls, stream, max_n: int = 4, top_k: int = 8) -> NgramTable:
        """A table over ``stream`` (1-D integer token ids, negative = separator)."""
        table = cls(max_n, top_k)
        table.update(stream)
        return table

    @property
    def max_n(self) -> int:
        return int(self._a["tail"].shape[0])

    @property
    def top_k(self) -> int:
        return int(self._a["tokens"].shape[1])

    def __len__(self) -> int:
        """Number of distinct n-grams stored."""
        return self._used

    @property
    def nbytes(self) -> int:
        """Bytes the table's arrays take now (allocated, not only used)."""
        return sum(v.nbytes for v in self._a.values())

    @staticmethod
    def bytes_for(max_ngrams: int, max_n: int = 4, top_k: int = 8) -> int:
        """The most bytes a table bounded to ``max_ngrams`` n-grams ever takes."""
        slots = 1 << int(2 * max_ngrams - 1).bit_length()
        return 4 * slots * (max_n + 1) + 12 * top_k * (max_ngrams + max_n) + 4 * max_n + 8

    @staticmethod
    def ngrams_for(nbytes: int, max_n: int = 4, top_k: int = 8) -> int:
        """The largest ``max_ngrams`` whose table fits in ``nbytes`` (ValueError if none does)."""
        lo, hi = 4 * max_n, max(4 * max_n, nbytes)
        if NgramTable.bytes_for(lo, max_n, top_k) > nbytes:
            raise ValueError(f"{nbytes} bytes cannot hold an n-gram table (at least "
                             f"{NgramTable.bytes_for(lo, max_n, top_k)} needed)")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if NgramTable.bytes_for(mid, max_n, top_k) <= nbytes:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def update(self, tokens) -> None:
        """Append ``tokens`` to the stream and count the n-grams they complete.

        The stream goes on from the previous call (n-grams span the boundary); start the
        new tokens with a separator (any negative id) to begin a new document instead.
        Grows the table as needed. Raises ValueError for a non-integer or non-1-D input,
        or once the stream passes 2**31 - 1 tokens (counts are int32).
        """
        a = self._a
        new = _as_stream(tokens, "tokens")
        if int(a["seen"][0]) + new.shape[0] > _MAX_COUNT:
            raise ValueError(
                f"an n-gram table counts at most {_MAX_COUNT} tokens (int32 counts), got "
                f"{int(a['seen'][0])} seen + {new.shape[0]} new"
            )
        if not self._owned:
            self._a = a = {name: v.copy() for name, v in a.items()}
            self._owned = True
        stream = np.concatenate([a["tail"], new])
        p = self.max_n
        while True:
            room = min(int(a["slots"].shape[0] * _MAX_LOAD), a["tokens"].shape[0])
            p, self._used = _insert(
                a["slots"], a["tokens"], a["counts"], a["errors"], stream, p, self._used, room
            )
            if p == stream.shape[0]:
                break
            self._grow()
            a = self._a
        a["tail"][:] = stream[-self.max_n :]
        a["seen"][0] += new.shape[0]

    def _grow(self) -> None:
        """Room for max_n more n-grams: slots x2 past half full, value rows x1.5 when full,
        up to max_ngrams; past it, evict."""
        a, need = self._a, self._used + self.max_n
        if self.max_ngrams is not None and self._used + self.max_n > self.max_ngrams:
            self._evict()
            return
        cap = self.max_ngrams or need
        if need > a["slots"].shape[0] * _MAX_LOAD:
            bigger = np.full((2 * a["slots"].shape[0], self.max_n + 1), -1, np.int32)
            _rehash(a["slots"], bigger)
            a["slots"] = bigger
        if need > a["tokens"].shape[0]:
            values = _values(min(max(need, a["tokens"].shape[0] * 3 // 2), cap + self.max_n), self.top_k)
            for name, v in values.items():
                v[: self._used] = a[name][: self._used]
            a.update(values)

    def _evict(self) -> None:
        """Keep the max_ngrams // 2 n-grams with the most occurrences (ties: the older)."""
        a, m, width = self._a, self._used, self.max_n
        keep = np.sort(np.argsort(-a["counts"][:m].sum(1, dtype=np.int64), kind="stable")[: self.max_ngrams // 2])
        row = np.full(m, -1, np.int32)
        row[keep] = np.arange(keep.shape[0], dtype=np.int32)
        fresh = _values(m - keep.shape[0], self.top_k)
        for name in ("tokens", "counts", "errors"):
            a[name][: keep.shape[0]] = a[name][keep]
            a[name][keep.shape[0] : m] = fresh[name]
        live = a["slots"][a["slots"][:, width] >= 0]
        live[:, width] = row[live[:, width]]
        a["slots"][:] = -1
        _rehash(live[live[:, width] >= 0], a["slots"])
        self._used = int(keep.shape[0])

    def lookup(self, context) -> tuple[int, np.ndarray, np.ndarray]:
        """Continuations of the longest suffix of ``context`` (at most max_n tokens) seen.

        ``context``: 1-D integer token ids; the suffix stops at a separator. Returns (n,
        tokens int32[k], counts int32[k]), fresh arrays sorted by (count desc, token asc),
        k <= top_k; n = 0 and empty arrays when no suffix was ever followed by a token.
        """
        ctx = _as_stream(context, "context")
        a = self._a
        n, k = _lookup(
            a["slots"], a["tokens"], a["counts"], ctx, self._out_tokens, self._out_counts
        )
        return n, self._out_tokens[:k].copy(), self._out_counts[:k].copy()

    def state(self) -> dict[str, np.ndarray]:
        """The table as arrays (views, not copies; m = len(self)):

        slots  int32[cap, max_n + 1]  hash slots: the n-gram (-1 padded) and its row, -1 if empty
        tokens int32[m, top_k]        continuation tokens of each n-gram, -1 for unused entries
        counts int32[m, top_k]        their counts, sorted by (count desc, token asc)
        errors int32[m, top_k]        overestimation bound of each count (Space-Saving)
        tail   int32[max_n]           the stream's last tokens (-1 before its start)
        seen   int64[1]               tokens counted so far
        """
        rows = ("tokens", "counts", "errors")
        return {name: v[: self._used] if name in rows else v for name, v in self._a.items()}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], max_ngrams: int | None = None) -> NgramTable:
        """A table reading ``arrays`` from ``state()`` in place (read-only is fine), bounded
        to ``max_ngrams`` from its next update on (see ``__init__``).

        The arrays are never written: the first ``update`` copies them. Names, dtypes and
        shapes are checked (ValueError), contents are trusted, so opening a memory-mapped
        table reads nothing until a lookup.
        """
        need = {"slots": 2, "tokens": 2, "counts": 2, "errors": 2, "tail": 1, "seen": 1}
        if set(arrays) != set(need):
            raise ValueError(f"n-gram state must have arrays {sorted(need)}, got {sorted(arrays)}")
        a = {name: np.asarray(arrays[name]) for name in need}
        for name, ndim in need.items():
            v = a[name]
            dtype = np.int64 if name == "seen" else np.int32
            if v.dtype != dtype or v.ndim != ndim or not v.flags.c_contiguous:
                raise ValueError(
                    f"n-gram state '{name}' must be {ndim}-D contiguous {np.dtype(dtype)}, "
                    f"got {v.dtype} {list(v.shape)}"
                )
        cap, width = a["slots"].shape
        m, top_k = a["tokens"].shape
        if (
            cap < 2 or cap & (cap - 1) or width < 2 or top_k < 1 or m > cap * _MAX_LOAD
            or a["counts"].shape != (m, top_k) or a["errors"].shape != (m, top_k)
            or a["tail"].shape != (width - 1,) or a["seen"].shape != (1,)
        ):
            raise ValueError(
                "n-gram state shapes are inconsistent: "
                + ", ".join(f"{name} {list(v.shape)}" for name, v in a.items())
                + " (want slots [cap, max_n + 1] with cap a power of two holding at least "
                "twice the m rows of tokens, counts and errors [m, top_k], tail [max_n], seen [1])"
            )
        table = cls.__new__(cls)
        table._a = a
        table._used = m
        table._owned = False
        table.max_ngrams = max_ngrams
        table._out_tokens = np.empty(top_k, np.int32)
        table._out_counts = np.empty(top_k, np.int32)
        return table
