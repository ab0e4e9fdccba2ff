"""REST over a sharded datastore: every shard searched in parallel, their matches merged so
the drafts equal those of one datastore over the same documents."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numba
import numpy as np

from retrodraft.index import suffix_array
from retrodraft.index.shard_merge import merged_continuations
from retrodraft.retrieval.drafters import CORPUS_DECAY, CORPUS_FIRST, CorpusDrafter


def _readonly(a: np.ndarray, dtype) -> np.ndarray:
    v = np.ascontiguousarray(a, dtype).view()
    v.flags.writeable = False
    return v


class ShardIndex:
    """The shards' streams, suffix arrays, doc offsets and document keys, searched as one.

    ``shards``: (tokens int32, suffix_array int64, doc_offsets int64, keys int64 [docs])
    per shard, typically memory-mapped views (read, never written); ``keys`` order the
    documents as one datastore's stream would (see ``index.shard_merge``). A position of
    the whole is virtual: ``bases[s] + position in shard s``. ``threads``: how many shards
    are searched at once (the kernels release the GIL); default min(shards, cores). Call
    ``close`` (or let the owner's close) to stop the threads.
    """

    def __init__(self, shards: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                 threads: int | None = None):
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        cols = list(zip(*[(_readonly(t, np.int32), _readonly(sa, np.int64), _readonly(o, np.int64),
                           _readonly(k, np.int64)) for t, sa, o, k in shards]))
        self.tokens, self.sas, self.offsets, self.keys = (list(c) for c in cols)
        # numba typed lists, built once: the merge kernel indexes shards by number.
        self._typed = tuple(numba.typed.List(c) for c in cols)
        sizes = np.array([t.shape[0] for t in self.tokens], np.int64)
        self.bases = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        self.size = int(sizes.sum())
        threads = min(len(shards), os.cpu_count() or 1) if threads is None else threads
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        # One group of shards per thread: a task per shard would cost more than a search.
        self._groups = [list(range(i, len(shards), threads)) for i in range(min(threads, len(shards)))]
        self._pool = ThreadPoolExecutor(len(self._groups)) if len(self._groups) > 1 else None

    def __len__(self) -> int:
        return len(self.tokens)

    def longest_match(self, context: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(los int64 [k], his int64 [k], length): the longest suffix of ``context`` (<= max_len)
        found in any shard, and its range in each shard's suffix array (lo == hi where absent)."""
        found = np.zeros((len(self), 3), np.int64)

        def search(group: list[int]) -> None:
            for s in group:
                found[s] = suffix_array.longest_match(self.tokens[s], self.sas[s], context, max_len)

        if self._pool is None:
            search(self._groups[0])
        else:
            list(self._pool.map(search, self._groups))
        length = int(found[:, 2].max())
        hit = found[:, 2] == length
        return np.where(hit, found[:, 0], 0), np.where(hit, found[:, 1], 0), length

    def continuations(self, los: np.ndarray, his: np.ndarray, length: int, max_positions: int, depth: int,
                      budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``suffix_array.continuations`` over the shards' ranges, origins virtual positions."""
        (hit,) = np.nonzero(his > los)
        if hit.shape[0] == 1:
            # All occurrences in one shard: its own order is the whole's, no merge needed.
            s = int(hit[0])
            out = suffix_array.continuations(self.tokens[s], self.sas[s], int(los[s]), int(his[s]), length,
                                             max_positions, depth, budget)
            return (*out[:3], out[3] + self.bases[s])
        return merged_continuations(*self._typed, self.bases, los, his, length, max_positions, depth, budget)

    def shard_of(self, position: int) -> tuple[int, int]:
        """(shard, position in it) of a virtual position (ValueError outside [0, size))."""
        if not 0 <= position < self.size:
            raise ValueError(f"position must be in [0, {self.size}), got {position}")
        s = int(np.searchsorted(self.bases, position, side="right")) - 1
        return s, position - int(self.bases[s])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class ShardedCorpusDrafter(CorpusDrafter):
    """``CorpusDrafter`` over a ``ShardIndex``: same parameters, same drafts as one datastore.

    The longest match is the longest over all shards; only shards holding it contribute,
    their occurrences merged in one suffix array's order before the evenly spaced sample
    of ``max_positions`` is taken. ``locate`` maps a virtual position to (document, offset).
    """

    def __init__(self, index: ShardIndex, locate: Callable[[int], tuple[str, int]] | None = None,
                 max_len: int = 16, min_len: int = 2, max_positions: int = 256, depth: int = 12,
                 first: Sequence[float] = CORPUS_FIRST, decay: Sequence[float] = CORPUS_DECAY):
        # No single stream: the search below goes through the shards instead.
        super().__init__(np.empty(0, np.int32), np.empty(0, np.int64), locate, max_len, min_len, max_positions,
                         depth, first, decay)
        self.index = index

    def _continuations(self, context: np.ndarray, budget: int) -> tuple[tuple, int] | None:
        if self.index.size == 0:
            return None
        los, his, m = self.index.longest_match(context, self.max_len)
        if m < self.min_len:
            return None
        return self.index.continuations(los, his, m, self.max_positions, self.depth, budget), m
