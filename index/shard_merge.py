"""REST continuations over several suffix arrays, equal to those of one suffix array over all.

A sharded datastore holds k shards, each a stream (documents followed by -1) with its own
suffix array. One datastore over the same documents would hold them in one stream, in
"document order": the order of a key per document (the sequence number of its source file;
all records of a file live in one shard, in order). ``index.suffix_array.continuations``
samples the occurrences of a match at evenly spaced ranks of that one suffix array, so the
merge must walk the shards' ranges in the one array's order:

- tokens compare by id, a separator sorts below every token (as in ``suffix_array``);
- two suffixes equal up to a separator each (same offset) compare by where those
  separators would sit in the one stream: by the key of the document they end.

Within a shard the suffix array already has that order (its documents are in document
order). Positions handed out are "virtual": ``bases[s] + position in shard s``.
"""

import numba
import numpy as np

from retrodraft.index.suffix_array import counted_tree, sampled_tree


def merged_continuations(
    streams,
    sas,
    offsets,
    keys,
    bases: np.ndarray,
    los: np.ndarray,
    his: np.ndarray,
    length: int,
    max_positions: int,
    depth: int,
    budget: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``suffix_array.continuations`` over the union of the ranges ``sas[s][los[s]:his[s]]``.

    ``streams``/``sas``/``offsets``/``keys``: numba typed Lists, one entry per shard, of
    read-only contiguous int32 streams, int64 suffix arrays, int64 doc offsets
    [docs + 1] and int64 document keys [docs] (strictly increasing within a shard, distinct
    across shards). ``bases`` int64 [k]: virtual start of each shard. ``los``/``his`` int64
    [k]: each shard's range of the ``length``-token match (lo == hi where a shard has none).
    Returns (tokens int32, parents int32, scores float32, origins int64 virtual positions),
    equal to what one suffix array over all documents in document order would give.
    """
    m = min(max_positions, int(np.sum(his - los)))
    return sampled_tree(m, depth, budget,
                        lambda *out: _merged(streams, sas, offsets, keys, bases, los, his, length, m, depth, *out))


@numba.njit(cache=True, nogil=True)
def _precedes(streams, offsets, keys, s, p, t, q, d):
    """Whether suffix p of shard s sorts before suffix q of shard t (s != t); the first d
    symbols are known equal."""
    a_stream, b_stream = streams[s], streams[t]
    while True:
        # Every stream ends with a separator, so p + d and q + d stay inside.
        a, b = a_stream[p + d], b_stream[q + d]
        if a < 0 or b < 0:
            if a >= 0:
                return False
            if b >= 0:
                return True
            da = np.searchsorted(offsets[s], p + d, side="right") - 1
            db = np.searchsorted(offsets[t], q + d, side="right") - 1
            return keys[s][da] < keys[t][db]
        if a != b:
            return a < b
        d += 1


@numba.njit(cache=True, nogil=True)
def _sift_down(heap, size, i, streams, sas, offsets, keys, ptr, length):
    """Move ``heap[i]`` down until ``heap[:size]`` (shards by their head suffix) is a heap below i."""
    while True:
        c = 2 * i + 1
        if c >= size:
            return
        a = heap[c]
        if c + 1 < size:
            b = heap[c + 1]
            if _precedes(streams, offsets, keys, b, sas[b][ptr[b]], a, sas[a][ptr[a]], length):
                c += 1
                a = b
        top = heap[i]
        if not _precedes(streams, offsets, keys, a, sas[a][ptr[a]], top, sas[top][ptr[top]], length):
            return
        heap[i], heap[c] = a, top
        i = c


@numba.njit(cache=True, nogil=True)
def _merged(streams, sas, offsets, keys, bases, los, his, length, m, depth, tokens, parents, scores, origins):
    r = 0
    for s in range(los.shape[0]):
        r += his[s] - los[s]
    ptr = los.copy()
    # The sampled continuations, copied into one scratch stream (each followed by -1), so
    # the one-stream trie builder sees exactly what it would see in one datastore.
    scratch = np.empty(m * (depth + 1), np.int32)
    where = np.empty(m * (depth + 1), np.int64)
    starts = np.empty(m, np.int64)
    # A binary heap of the shards with occurrences left, by head suffix: each element costs
    # at most 2 log2(shards) comparisons, however the shards interleave.
    heap = np.empty(los.shape[0], np.int64)
    size = 0
    for s in range(los.shape[0]):
        if ptr[s] < his[s]:
            heap[size] = s
            size += 1
    for j in range(size // 2 - 1, -1, -1):
        _sift_down(heap, size, j, streams, sas, offsets, keys, ptr, length)
    w = 0
    i = 0
    for g in range(r):
        best = heap[0]
        if g == i * r // m:
            stream = streams[best]
            p0 = sas[best][ptr[best]] + length
            starts[i] = w
            for d in range(depth):
                p = p0 + d
                if p >= stream.shape[0] or stream[p] < 0:
                    break
                scratch[w] = stream[p]
                where[w] = bases[best] + p
                w += 1
            scratch[w] = -1
            where[w] = -1
            w += 1
            i += 1
            if i == m:
                break
        ptr[best] += 1
        if ptr[best] >= his[best]:
            size -= 1
            heap[0] = heap[size]
        _sift_down(heap, size, 0, streams, sas, offsets, keys, ptr, length)
    k = counted_tree(scratch[:w], starts, depth, tokens, parents, scores, origins)
    for j in range(k):
        origins[j] = where[origins[j]]
    return k
