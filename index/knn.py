"""Exact nearest neighbours over fp16 key vectors (NEST's token-level retrieval).

Keys [N, d] stay fp16 in memory (a memory map is fine); each task widens 4 rows at a time
to fp32 in a buffer, scores them against every query and keeps a bounded heap of the best
k per query, so memory is O(threads * q * k) whatever N is. Measured on 2 cores, 1M x 576
keys: a Numba prange over row chunks takes 0.25-0.3 s for 1 query and 0.6-1.0 s for 16;
widening blocks to fp32 for a BLAS matmul took 1.6-2.1 s, numpy's fp16 cast being slow.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_TWO_112 = np.float32(2.0**112)
_U13, _U15, _U16 = np.uint32(13), np.uint32(15), np.uint32(16)
_EM, _SIGN, _U400, _INF_EXP = (np.uint32(v) for v in (0x7FFF, 0x8000, 0x400, 0x7F800000))
_ROWS = 4
_MIN_CHUNK = 4096
_NO_ID = np.iinfo(np.int64).max


@numba.njit(cache=True, nogil=True)
def _widen(h, bits):
    """fp16 bits uint16[d] -> fp32 bits uint32[d], exact for every value.

    Numba has no CPU float16, and this branch-free form vectorises: the sign moves from bit
    15 to 31, exponent and mantissa shift into fp32 position, inf/nan (em >= 0x7c00, i.e.
    em + 0x400 carries into bit 15) get an all-ones exponent, then a product with 2**112
    rebiases the exponent of normals and subnormals alike and leaves inf/nan as they are.
    """
    for j in range(h.shape[0]):
        x = np.uint32(h[j])
        em = x & _EM
        bits[j] = (em << _U13) | ((x & _SIGN) << _U16) | ((em + _U400) >> _U15) * _INF_EXP
    f = bits.view(np.float32)
    for j in range(h.shape[0]):
        f[j] *= _TWO_112


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _score4(f, x, l2, out):
    """out[r] = <f[r], x>, or -||f[r] - x||^2 when l2 (higher is better either way)."""
    s0 = s1 = s2 = s3 = np.float32(0)
    if l2:
        for j in range(x.shape[0]):
            t0, t1, t2, t3 = f[0, j] - x[j], f[1, j] - x[j], f[2, j] - x[j], f[3, j] - x[j]
            s0 -= t0 * t0
            s1 -= t1 * t1
            s2 -= t2 * t2
            s3 -= t3 * t3
    else:
        for j in range(x.shape[0]):
            s0 += f[0, j] * x[j]
            s1 += f[1, j] * x[j]
            s2 += f[2, j] * x[j]
            s3 += f[3, j] * x[j]
    out[0], out[1], out[2], out[3] = s0, s1, s2, s3


@numba.njit(cache=True, nogil=True)
def _worse(s1, i1, s2, i2):
    return s1 < s2 or (s1 == s2 and i1 > i2)


@numba.njit(cache=True, nogil=True)
def _offer(hs, hi, size, s, i):
    """Offer (score s, id i) to a heap of ``size`` entries with its worst entry on top."""
    if size < hs.shape[0]:
        c = size
        hs[c], hi[c] = s, i
        while c > 0 and _worse(hs[c], hi[c], hs[(c - 1) // 2], hi[(c - 1) // 2]):
            p = (c - 1) // 2
            hs[c], hs[p], hi[c], hi[p] = hs[p], hs[c], hi[p], hi[c]
            c = p
        return
    if not _worse(hs[0], hi[0], s, i):
        return
    hs[0], hi[0] = s, i
    c = 0
    while True:
        w = 2 * c + 1
        if w >= size:
            return
        if w + 1 < size and _worse(hs[w + 1], hi[w + 1], hs[w], hi[w]):
            w += 1
        if not _worse(hs[w], hi[w], hs[c], hi[c]):
            return
        hs[c], hs[w], hi[c], hi[w] = hs[w], hs[c], hi[w], hi[c]
        c = w


@numba.njit(cache=True, nogil=True)
def _scan(keys, queries, rows, lo, hi, l2, ids, scores):
    """Best ``ids.shape[1]`` rows per query among positions [lo, hi) into unordered heaps.

    keys uint16[N, d] (fp16 bits), queries float32[q, d], rows int64[m] or None (position p
    is row p); ids int64[q, kk], scores float32[q, kk] with kk <= hi - lo.
    """
    q, d = queries.shape
    bits = np.empty((_ROWS, d), np.uint32)
    f = bits.view(np.float32)
    s = np.empty(_ROWS, np.float32)
    row = np.empty(_ROWS, np.int64)
    size = 0
    for p in range(lo, hi, _ROWS):
        m = min(_ROWS, hi - p)
        for r in range(m):
            if rows is None:
                row[r] = p + r
            else:
                row[r] = rows[p + r]
            _widen(keys[row[r]], bits[r])
        for a in range(q):
            _score4(f, queries[a], l2, s)  # rows r >= m hold stale data and are not offered
            for r in range(m):
                v = s[r] if s[r] == s[r] else np.float32(-np.inf)  # a nan row ranks last
                _offer(scores[a], ids[a], min(size + r, ids.shape[1]), v, row[r])
        size += m


@numba.njit(cache=True, parallel=True)
def _scan_chunks(keys, queries, rows, n, chunk, l2, ids, scores):
    """``_scan`` of positions [c * chunk, (c + 1) * chunk) into ids[c], scores[c], in parallel."""
    for c in numba.prange(ids.shape[0]):
        lo = c * chunk
        _scan(keys, queries, rows, lo, min(n, lo + chunk), l2, ids[c], scores[c])


def _check_keys(keys) -> None:
    if not isinstance(keys, np.ndarray) or keys.dtype != np.float16 or keys.ndim != 2 or not (
        keys.flags.c_contiguous
    ):
        got = f"{keys.dtype} {list(keys.shape)}" if isinstance(keys, np.ndarray) else type(keys)
        raise ValueError(f"keys must be a C-contiguous 2-D float16 array [N, d], got {got}")


def _search(keys, queries, rows, k, metric, parallel=True) -> tuple[np.ndarray, np.ndarray]:
    """Both searches after their own checks; rows int64[m] sorted unique, or None for all."""
    x = np.asarray(queries)
    if x.ndim != 2 or x.shape[1] != keys.shape[1] or x.dtype.kind not in "fiu":
        raise ValueError(
            f"queries must be a 2-D real array [q, {keys.shape[1]}], got {x.dtype} {list(x.shape)}"
        )
    x = np.ascontiguousarray(x, np.float32)
    if not np.isfinite(x).all():
        raise ValueError("queries must be finite (as fp32), got inf or nan")
    if not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    n = keys.shape[0] if rows is None else rows.shape[0]
    q, kout = x.shape[0], min(int(k), n)
    if q == 0 or kout == 0:
        return np.empty((q, kout), np.int64), np.empty((q, kout), np.float32)
    # a few chunks per thread; a parallel launch costs more than scanning a small chunk
    threads = 1 if n <= _MIN_CHUNK or not parallel else numba.get_num_threads()
    chunk = n if threads == 1 else max(_MIN_CHUNK, math.ceil(n / (4 * threads)))
    chunks = math.ceil(n / chunk)
    kk = min(kout, chunk)
    ids = np.full((chunks, q, kk), _NO_ID, np.int64)
    scores = np.full((chunks, q, kk), -np.inf, np.float32)
    h, l2 = keys.view(np.uint16), metric == "l2"
    if chunks == 1:
        _scan(h, x, rows, 0, n, l2, ids[0], scores[0])
    else:
        _scan_chunks(h, x, rows, n, chunk, l2, ids, scores)
    ids = ids.transpose(1, 0, 2).reshape(q, -1)  # int64 [q, chunks * kk]
    scores = scores.transpose(1, 0, 2).reshape(q, -1)
    order = np.lexsort((ids, -scores), axis=-1)[:, :kout]
    ids = np.take_along_axis(ids, order, -1)
    scores = np.take_along_axis(scores, order, -1)
    return ids, (-scores if l2 else scores)


def search(keys: np.ndarray, queries, k: int, metric: str = "ip",
           parallel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``keys`` for each query.

    keys float16[N, d], C-contiguous (not copied; a memory map is fine); queries real
    [q, d] (used as float32, must be finite). metric "ip" ranks by inner product, highest
    first; "l2" by squared Euclidean distance, smallest first. Ties go to the lower row id;
    a nan score (from a nan key) counts as the worst (-inf product, inf distance). Returns
    fresh arrays (ids int64[q, min(k, N)], scores float32[q, min(k, N)]): the inner
    products or squared distances, computed in float32. Raises ValueError for wrong dtypes
    or shapes, a negative k or an unknown metric. ``parallel=False`` scans on the calling
    thread only: for a few tens of thousands of rows per call inside a loop whose model
    forward already uses every core (measured on this project's loaded 2-core VM, 16,384 x
    128 keys: 1 ms on one thread, 80 ms waiting for a parallel launch).
    """
    _check_keys(keys)
    return _search(keys, queries, None, k, metric, parallel)


def search_rows(
    keys: np.ndarray, queries, rows, k: int, metric: str = "ip", parallel: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``search`` restricted to the given rows (row ids into keys; duplicates count once).

    The second stage of a two-stage search: ``rows`` (1-D integer, in [0, N)) are shared by
    all queries and returned ids are row ids of ``keys``; at most min(k, distinct rows)
    results per query.
    """
    _check_keys(keys)
    r = np.asarray(rows)
    if r.ndim != 1 or not (r.dtype.kind in "iu" or r.size == 0):
        raise ValueError(f"rows must be 1-D integer row ids, got {r.dtype} {list(r.shape)}")
    n = keys.shape[0]
    if r.size and (r.min() < 0 or r.max() >= n):
        raise ValueError(f"rows must be in [0, {n}), got values in [{r.min()}, {r.max()}]")
    # sorted rows also read the keys in memory order
    r = np.sort(r.astype(np.int64))
    first = np.ones(r.shape, bool)
    first[1:] = r[1:] != r[:-1]
    return _search(keys, queries, r[first], k, metric, parallel)
